"""`glassforge verify RELEASE`: check, claim by claim, that a release is what it says it is.

Everything it needs is in the release folder. Without options it recomputes
every file's sha256 against `manifest.json`, the manifest's against the
attestation, the weights', tokenizer's and recipe's against the attestation's
predicate, checks that `config.json` is the recipe's model, that the
checkpoint chain links up and ends at the released weights, that the training
log agrees with the steps attested, that every carried checkpoint is the one
in the chain, and the signature where there is one.

Three of the claims are the field's own tools' verdicts, not glassforge's:
`in-toto statement` (the in-toto project's `in_toto_attestation.v1`
bindings validate attestation.json), `signature` (OpenSSF Model Signing's
`model-signing` library checks model.sig over every file, with `--public-key`
or the key the release ships; signing.py) and `croissant` / `croissant data`
(MLCommons' `mlcroissant` accepts croissant.json, whose file hashes are the
data pack's; croissant.py). `sign_command` signs a finished release only once
everything else verifies.

`--data` adds the training data the release carries (release/datapack.py):
every document's sha256 recomputed from its text, the Merkle roots recomputed
from those in the training order, the order's hash and the counts, against the
attestation. `--data RUN` checks a run folder's documents instead (the
builder's own copy).

`--replay [last|all|sample]` re-trains attested intervals from the release's
data and compares the checkpoints it reaches with the attested ones, bit for
bit or within a calibrated floating-point tolerance (release/replay.py), and
says what share of the training it covered.

Each claim prints as `PASS name: reason` or `FAIL name: reason`; the exit code
is 1 if any claim failed, 2 for a mistake in the command. Files are read as
JSON, text, Parquet or safetensors only: never pickle, never `torch.load`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from glassforge.core.errors import UserError
from glassforge.core.hashing import hashing_once, sha256_file
from glassforge.core.manifest import folder_sha256, read_manifest_head
from glassforge.core.recipe import ModelConfig, load_recipe, parse_recipe
from glassforge.core.runfolder import OPTIMIZER, RECIPE, TRAINER, WEIGHTS, Release, Run, TraceFolder
from glassforge.data.checks import verify_data
from glassforge.release.attest import PREDICATE_TYPE, STATEMENT_TYPE, check_chain, dependency_lock, validate_statement
from glassforge.release.croissant import check_croissant
from glassforge.release.datapack import check_pack, pack_documents
from glassforge.release.replay import MODES, replay_release
from glassforge.tokenizer.bpe import load_tokenizer
from glassforge.train.rewards import reward_table
from glassforge.train.rl import rescore_rollouts
from glassforge.release.signing import check_signature, load_private_key, load_public_key, sign_release

Claim = tuple[str, bool, str]


def _short(h: str | None) -> str:
    return (h or "none")[:12]


def _load_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{path.name} is not valid JSON ({e})"


# --------------------------------------------------------------------------- the release alone

def check_files(release: Path, manifest: dict) -> list[Claim]:
    listed = manifest.get("files", {})
    claims: list[Claim] = []
    for name, entry in sorted(listed.items()):
        path = release / name
        if not path.is_file():
            claims.append((f"file {name}", False, "listed in manifest.json but missing"))
            continue
        actual = sha256_file(path)
        if actual != entry.get("sha256"):
            claims.append((f"file {name}", False, f"changed: sha256 {_short(actual)}... but manifest.json says "
                                                  f"{_short(entry.get('sha256'))}..."))
    present = {p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file()}
    for name in sorted(present - set(listed) - set(Release(release).signed_files) - {Release(release).manifest.name}):
        claims.append((f"file {name}", False, "present but not listed in manifest.json"))
    if not claims:
        claims.append(("files", True, f"all {len(listed)} files match their sha256 in manifest.json"))
    return claims


def check_attestation(release: Path, stmt: dict, manifest: dict) -> list[Claim]:
    claims: list[Claim] = []
    pred = stmt.get("predicate") or {}
    subject = (stmt.get("subject") or [{}])[0]
    why = validate_statement(stmt)
    if why is None and (stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE):
        why = f"predicateType {stmt.get('predicateType')!r}, not glassforge's {PREDICATE_TYPE}"
    claims.append(("in-toto statement", why is None, f"attestation.json is an in-toto Statement v1 (checked by "
                   f"in_toto_attestation.v1), predicate {PREDICATE_TYPE}" if why is None else
                   f"attestation.json is not a valid in-toto Statement v1: {why}"))

    want = (pred.get("release") or {}).get("manifest_sha256")
    actual = sha256_file(Release(release).manifest)
    claims.append(("manifest", actual == want, "manifest.json is the one attested" if actual == want else
                   f"manifest.json changed since it was attested: sha256 {_short(actual)}... but attested "
                   f"{_short(want)}..."))

    weights = sha256_file(Release(release).weights) if Release(release).weights.is_file() else None
    want = (subject.get("digest") or {}).get("sha256")
    claims.append(("weights", weights == want and subject.get("name") == WEIGHTS,
                   f"model.safetensors sha256 {_short(weights)}... is the attestation's subject" if weights == want
                   else f"model.safetensors sha256 {_short(weights)}... but the attestation's subject is {_short(want)}..."))

    tok = sha256_file(Release(release).tokenizer_json) if Release(release).tokenizer_json.is_file() else None
    want = (pred.get("tokenizer") or {}).get("sha256")
    claims.append(("tokenizer", tok == want, f"tokenizer.json is the attested tokenizer ({_short(tok)}...)"
                   if tok == want else f"tokenizer.json sha256 {_short(tok)}... but attested {_short(want)}..."))

    want = (pred.get("recipe") or {}).get("sha256")
    recipe = None
    try:
        recipe = parse_recipe(Release(release).recipe.read_bytes(), RECIPE)
        got = recipe.hash()
        claims.append(("recipe", got == want, f"recipe.toml resolves to the attested recipe ({_short(got)}...)"
                       if got == want else f"recipe.toml resolves to hash {_short(got)}... but attested {_short(want)}..."))
    except FileNotFoundError:
        claims.append(("recipe", False, "recipe.toml is missing"))
    except UserError as e:
        claims.append(("recipe", False, str(e)))

    cfg_json, err = _load_json(Release(release).config)
    if recipe is not None and cfg_json is not None:
        try:
            same = ModelConfig.from_hf(cfg_json) == recipe.model
        except (KeyError, TypeError, ValueError) as e:
            same, err = False, f"config.json is not a Llama config ({e})"
        claims.append(("config", same, "config.json is the recipe's model" if same else
                       err or "config.json does not describe the recipe's model"))
    elif err:
        claims.append(("config", False, err))

    chain = pred.get("checkpoints") or []
    broken = check_chain(chain) if chain else "no checkpoints attested"
    if broken is None and chain[-1].get("model_sha256") != (subject.get("digest") or {}).get("sha256"):
        broken = f"the last checkpoint ({chain[-1]['stage']} step {chain[-1]['step']}) is not the released weights"
    if broken is None:
        for stage, info in (pred.get("training") or {}).items():
            last = [c for c in chain if c["stage"] == stage]
            if not last or not info or last[-1]["step"] != info.get("steps"):
                broken = f"{stage}: attested {info and info.get('steps')} steps but its last checkpoint is " \
                         f"step {last[-1]['step'] if last else None}"
                break
    claims.append(("checkpoint chain", broken is None,
                   f"{len(chain)} checkpoints written in training link up and end at the released weights" if broken is None else broken))

    claims += _check_carried(release, pred, chain)
    claims += _check_metrics(release, pred)

    code = pred.get("code") or {}
    claims.append(("code version", bool(code.get("version")),
                   f"glassforge {code.get('version')}, git commit {code.get('git_commit') or 'unknown'}"
                   + (" (with uncommitted changes)" if code.get("git_dirty") else "")
                   + f", source {_short(code.get('source_sha256'))}..."
                   if code.get("version") else "no code version attested"))

    lock = pred.get("dependency_lock") or {}
    if lock.get("sha256"):
        here = dependency_lock().get("sha256")
        note = "" if here is None else (", the same as this installation's" if here == lock["sha256"]
                                        else ", not this installation's (replay may differ)")
        claims.append(("dependency lock", True, f"constraints.txt sha256 {_short(lock['sha256'])}... recorded{note}"))
    else:
        claims.append(("dependency lock", "reason" in lock, f"not recorded: {lock.get('reason', 'no reason given')}"))

    trace = pred.get("trace_index")
    if trace:
        got = folder_sha256(release / trace.get("folder", "trace"))
        claims.append(("trace index", got == trace.get("sha256"), "trace/ is the attested index" if got == trace.get("sha256")
                       else f"trace/ hashes to {_short(got)}... but attested {_short(trace.get('sha256'))}..."))
        for shard in trace.get("shards", []):
            index = TraceFolder(release / trace.get("folder", "trace") / shard["folder"]).index
            have = sha256_file(index) if index.is_file() else None
            claims.append((f"trace shard {shard['folder']}", have == shard["index_sha256"],
                           f"{shard['folder']}/{index.name} is the attested shard" if have == shard["index_sha256"]
                           else f"{shard['folder']}/{index.name} is {'missing' if have is None else 'not the attested one'}"))
    return claims


def _check_carried(release: Path, pred: dict, chain: list[dict]) -> list[Claim]:
    """Every checkpoint the release carries under replay/ is the attested one of its stage and step."""
    by_step = {(c["stage"], c["step"]): c for c in chain}
    carried = (pred.get("replay") or {}).get("carried") or []
    bad = None
    for c in carried:
        entry = by_step.get((c.get("stage"), c.get("step")))
        folder = Release(release).root / str(c.get("folder"))
        if entry is None:
            bad = f"{c.get('folder')}: {c.get('stage')} step {c.get('step')} is not in the checkpoint chain"
        else:
            for fname, key in ((WEIGHTS, "model_sha256"), (OPTIMIZER, "optimizer_sha256"), (TRAINER, "trainer_sha256")):
                if not (folder / fname).is_file():
                    bad = f"{c['folder']}/{fname} is missing"
                elif sha256_file(folder / fname) != entry[key]:
                    bad = f"{c['folder']}/{fname} is not the attested {c['stage']} step-{c['step']} checkpoint's"
                if bad:
                    break
        if bad:
            break
    if bad:
        return [("carried checkpoints", False, bad)]
    return [("carried checkpoints", True, f"{len(carried)} checkpoints under replay/ are the attested ones"
             if carried else "the release carries no checkpoint (replays start at step 0)")]


def _check_metrics(release: Path, pred: dict) -> list[Claim]:
    path = Release(release).metrics
    if not path.is_file():
        return [("training log", False, "metrics.jsonl is missing")]
    last: dict[str, int] = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                last[row.get("stage", "pretrain")] = row["step"]
    except (ValueError, KeyError) as e:
        return [("training log", False, f"metrics.jsonl is malformed ({e})")]
    for stage, info in (pred.get("training") or {}).items():
        if info and last.get(stage) != info.get("steps"):
            return [("training log", False, f"metrics.jsonl ends {stage} at step {last.get(stage)} but "
                                            f"{info.get('steps')} steps are attested")]
    return [("training log", True, "metrics.jsonl covers the attested steps: " +
             ", ".join(f"{s} {i['steps']} steps, {i.get('tokens') or 0:,} tokens"
                       for s, i in (pred.get("training") or {}).items() if i))]


def check_rollouts(release: Path, pred: dict) -> list[Claim]:
    """RL's logged rollouts: the attested file, every completion scored again from the pack's documents."""
    info = (pred.get("training") or {}).get("rl")
    if not info:
        return []
    spec, path = info.get("rollouts") or {}, Release(release).rollouts
    if not path.is_file() or sha256_file(path) != spec.get("sha256"):
        return [("rl rollouts", False, f"{path.name} is missing or not the attested rollout log")]
    try:
        table = reward_table(pack_documents(release))
    except UserError as e:
        return [("rl rollouts", False, f"no reward table to score with: {e}")]
    steps, completions, why = rescore_rollouts(path.read_text(encoding="utf-8").splitlines(), table,
                                               load_tokenizer(release))
    if why:
        return [("rl rollouts", False, f"{path.name}: {why}")]
    return [("rl rollouts", steps == info.get("steps"), f"all {completions:,} logged completions of {steps} steps "
             f"score again, from the data pack's documents, to their logged rewards and advantages"
             if steps == info.get("steps") else f"{path.name} logs {steps} steps but {info.get('steps')} are attested")]


# --------------------------------------------------------------------------- --data RUN


def check_run_data(run_root: Path, pred: dict) -> list[Claim]:
    """A run folder's documents against its data manifest (the data stage's own checks), and both against the
    attestation: the builder's copy of the data, where `--data` alone checks the release's."""
    run = Run.open(run_root)
    attested = pred.get("data") or {}
    claims: list[Claim] = [(f"data {name}", bool(ok), reason) for name, ok, reason in verify_data(run)]
    try:
        head = read_manifest_head(run)
    except (UserError, ValueError) as e:
        return claims + [("data manifest", False, str(e))]
    got, want = (head.get("merkle") or {}).get("mix"), attested.get("mix_merkle_root")
    claims.append(("data root attested", got == want, f"the run's data mix Merkle root {_short(got)}... is the "
                   f"attested one" if got == want else f"the run's data manifest has Merkle root {_short(got)}... "
                                                        f"but attested {_short(want)}..."))
    got, want = head.get("order_sha256"), attested.get("order_sha256")
    claims.append(("data order attested", got == want, "the run's data order is the attested one" if got == want
                   else f"the run's order.txt hash {_short(got)}... but attested {_short(want)}..."))
    tok = sha256_file(run.tokenizer_json) if run.tokenizer_json.is_file() else None
    want = (pred.get("tokenizer") or {}).get("sha256")
    claims.append(("run tokenizer", tok == want, "the run's tokenizer.json is the attested tokenizer"
                   if tok == want else f"the run's tokenizer.json sha256 {_short(tok)}... but attested {_short(want)}..."))
    try:
        got = load_recipe(run.recipe).hash()
    except UserError as e:
        got = str(e)
    want = (pred.get("recipe") or {}).get("sha256")
    claims.append(("run recipe", got == want, "the run's recipe.toml is the attested recipe" if got == want
                   else f"the run's recipe.toml resolves to {_short(got)}... but attested {_short(want)}..."))
    return claims


# --------------------------------------------------------------------------- entry points


def _release_folder(path: Path) -> Path:
    release = Path(path)
    if not release.is_dir():
        raise UserError(f"{release}: no such release folder")
    if not Release(release).manifest.exists() and Release(release / "release").manifest.is_file():
        release = release / "release"  # a run folder: its release
    return release


@hashing_once()  # the manifest, attestation and replay checks each ask for the same files' hashes
def verify_release(release: Path, replay: str | None = None, data: bool | Path = False,
                   public_key: Path | None = None, samples: int = 2, seed: int | None = None,
                   threads: int | None = None) -> list[Claim]:
    """Every claim about a release, each (name, passed, reason).

    data: True checks the release's own data pack, a path checks that run folder's documents instead.
    replay: None, or a coverage of release/replay.py (last, all, sample), with samples and seed for sample.
    """
    release = _release_folder(release)
    if public_key is not None:
        load_public_key(Path(public_key))  # a key file of the wrong kind is a mistake in the command: exit 2
    if replay is not None and replay not in MODES:
        raise UserError(f"--replay {replay}: expected one of {', '.join(MODES)}")
    signature = check_signature(release, public_key)  # over every file: whatever else is broken
    manifest, err = _load_json(Release(release).manifest)
    if err:
        return [("manifest", False, err)] + signature
    claims = check_files(release, manifest) + signature
    stmt, err = _load_json(Release(release).attestation)
    if err:
        return claims + [("attestation", False, err)]
    try:
        claims += check_attestation(release, stmt, manifest)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a hand-edited statement of the wrong shape
        return claims + [("attestation", False, f"attestation.json is malformed ({type(e).__name__}: {e})")]
    pred = stmt.get("predicate") or {}
    claims += check_croissant(release, (pred.get("data") or {}).get("pack") or {})
    if isinstance(data, Path):
        claims += check_run_data(data, pred)
    elif data or replay is not None:  # a replay trains on the pack: check it first
        claims += check_pack(release, pred.get("data") or {})
        claims += check_rollouts(release, pred)
    if replay is not None:
        claims += replay_release(release, pred, replay, samples=samples, seed=seed, threads=threads)
    return claims


def check_summary(release: Path) -> dict:
    """What a server states at start-up of the release it serves: every file hash and attestation claim,
    checked now, and what was not checked (the data pack and the training replay, which take minutes)."""
    t0 = time.perf_counter()
    try:
        claims = verify_release(Path(release))
    except UserError as e:
        claims = [("release", False, str(e))]
    except Exception as e:  # noqa: BLE001 - a check that crashes is a check that did not pass; say why
        claims = [("release", False, f"the check itself failed: {type(e).__name__}: {e}")]
    failed = [{"name": n, "reason": r} for n, ok, r in claims if not ok]
    return {
        "passed": not failed and bool(claims),
        "passed_count": len(claims) - len(failed),
        "total": len(claims),
        "failed": failed,
        "claims": [{"name": n, "ok": bool(ok), "reason": r} for n, ok, r in claims],
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 3),
        "how": "file hashes and attestation claims (glassforge verify without --data or --replay)",
        "checked": ["file hashes", "in-toto statement", "attestation", "checkpoint chain", "carried checkpoints",
                    "croissant", "signature"],
        "not_checked": {
            "data": "the training documents' hashes and Merkle roots: glassforge verify RELEASE --data",
            "replay": "that the weights re-train from the data: glassforge verify RELEASE --replay all",
        },
    }


def sign_command(release: Path, key: Path) -> dict:
    """`glassforge sign`: sign a finished release with model-signing, once every claim but the signature passes
    (a signer vouches for what it signs; a release changed since it was built is refused)."""
    release = _release_folder(release)
    load_private_key(Path(key), "--key")  # a bad key: one line, before minutes of hashing
    failed = [(n, r) for n, ok, r in verify_release(release) if not ok and n != "signature"]
    if failed:
        raise UserError(f"{release}: not signing a release that does not verify: FAIL {failed[0][0]}: {failed[0][1]}"
                        + (f" ({len(failed) - 1} more; `glassforge verify {release}` lists them)" if len(failed) > 1
                           else ""))
    return sign_release(release, Path(key), "--key")


def verify_command(release: Path, replay: str | None, data: bool | Path, public_key: Path | None,
                   samples: int = 2, seed: int | None = None, threads: int | None = None) -> int:
    """Print each claim as PASS or FAIL with its reason; 0 if all pass, 1 otherwise."""
    t0 = time.perf_counter()
    claims = verify_release(Path(release), replay, data, Path(public_key) if public_key else None,
                            samples=samples, seed=seed, threads=threads)
    for name, ok, reason in claims:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {reason}", flush=True)
    if not any(name == "signature" for name, _, _ in claims):
        print(f"NOTE signature: the release is not signed (no {Release(release).signature.name}): nothing ties it "
              f"to a signer; sign it with `glassforge sign RELEASE --key KEY`")
    failed = sum(not ok for _, ok, _ in claims)
    print(f"verify: {len(claims) - failed} of {len(claims)} claims pass" + (f", {failed} FAIL" if failed else "")
          + f" ({time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0
