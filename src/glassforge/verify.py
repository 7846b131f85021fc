"""`glassforge verify RELEASE`: check, claim by claim, that a release is what it says it is.

Without options it needs nothing but the release: it recomputes every file's
sha256 against `manifest.json`, the manifest's against the attestation, the
weights', tokenizer's and recipe's against the attestation's predicate, checks
that `config.json` is the recipe's model, that the checkpoint chain links up
and ends at the released weights, that the training log agrees with the steps
attested, that the carried replay checkpoint is the one in the chain, and the
ed25519 signature where there is one (against `--public-key` if given).

`--data RUN` adds the data: every document's sha256 recomputed from its text,
the data mix's Merkle root recomputed from those, the data order, and the
run's tokenizer and recipe against the attestation.

`--replay` (needs `--data RUN`, for the documents) re-tokenizes the training
documents with the release's tokenizer, resumes each training stage from the
release's replay checkpoint for the attested steps (`train.replay`), and
compares the resulting checkpoint's weights and optimiser state with the
attested hashes, bit for bit; fine-tuning's interval ends at the released
weights. That holds on the same platform (CPU model, thread count, torch version:
the attestation records them); elsewhere a mismatch may be floating point, not
tampering, and the message says so.

Each claim prints as `PASS name: reason` or `FAIL name: reason`; the exit code
is 1 if any claim failed. Files are read as JSON, text or safetensors only:
never pickle, never `torch.load`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from glassforge.errors import UserError
from glassforge.runfolder import hashing_once, sha256_file

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
    from glassforge.attest import SIGNED_FILES

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
    for name in sorted(present - set(listed) - set(SIGNED_FILES) - {"manifest.json"}):
        claims.append((f"file {name}", False, "present but not listed in manifest.json"))
    if not claims:
        claims.append(("files", True, f"all {len(listed)} files match their sha256 in manifest.json"))
    return claims


def check_attestation(release: Path, stmt: dict, manifest: dict) -> list[Claim]:
    from glassforge.attest import PREDICATE_TYPE, STATEMENT_TYPE, check_chain
    from glassforge.model import ModelConfig
    from glassforge.recipe import parse_recipe

    claims: list[Claim] = []
    pred = stmt.get("predicate") or {}
    subject = (stmt.get("subject") or [{}])[0]
    ok = stmt.get("_type") == STATEMENT_TYPE and stmt.get("predicateType") == PREDICATE_TYPE and bool(subject)
    claims.append(("attestation format", ok, f"in-toto Statement v1, predicate {PREDICATE_TYPE}" if ok else
                   f"_type {stmt.get('_type')!r}, predicateType {stmt.get('predicateType')!r}: not a glassforge "
                   f"in-toto Statement v1"))

    want = (pred.get("release") or {}).get("manifest_sha256")
    actual = sha256_file(release / "manifest.json")
    claims.append(("manifest", actual == want, "manifest.json is the one attested" if actual == want else
                   f"manifest.json changed since it was attested: sha256 {_short(actual)}... but attested "
                   f"{_short(want)}..."))

    weights = sha256_file(release / "model.safetensors") if (release / "model.safetensors").is_file() else None
    want = (subject.get("digest") or {}).get("sha256")
    claims.append(("weights", weights == want and subject.get("name") == "model.safetensors",
                   f"model.safetensors sha256 {_short(weights)}... is the attestation's subject" if weights == want
                   else f"model.safetensors sha256 {_short(weights)}... but the attestation's subject is {_short(want)}..."))

    tok = sha256_file(release / "tokenizer.json") if (release / "tokenizer.json").is_file() else None
    want = (pred.get("tokenizer") or {}).get("sha256")
    claims.append(("tokenizer", tok == want, f"tokenizer.json is the attested tokenizer ({_short(tok)}...)"
                   if tok == want else f"tokenizer.json sha256 {_short(tok)}... but attested {_short(want)}..."))

    want = (pred.get("recipe") or {}).get("sha256")
    recipe = None
    try:
        recipe = parse_recipe((release / "recipe.toml").read_bytes(), "recipe.toml")
        got = recipe.hash()
        claims.append(("recipe", got == want, f"recipe.toml resolves to the attested recipe ({_short(got)}...)"
                       if got == want else f"recipe.toml resolves to hash {_short(got)}... but attested {_short(want)}..."))
    except FileNotFoundError:
        claims.append(("recipe", False, "recipe.toml is missing"))
    except UserError as e:
        claims.append(("recipe", False, str(e)))

    cfg_json, err = _load_json(release / "config.json")
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
                   f"{len(chain)} kept checkpoints link up and end at the released weights" if broken is None else broken))

    claims += _check_replay_checkpoint(release, pred, chain)
    claims += _check_metrics(release, pred)

    code = pred.get("code") or {}
    claims.append(("code version", bool(code.get("version")),
                   f"glassforge {code.get('version')}, git commit {code.get('git_commit') or 'unknown'}"
                   + (" (with uncommitted changes)" if code.get("git_dirty") else "")
                   + f", source {_short(code.get('source_sha256'))}..."
                   if code.get("version") else "no code version attested"))

    lock = pred.get("dependency_lock") or {}
    if lock.get("sha256"):
        from glassforge.attest import dependency_lock

        here = dependency_lock().get("sha256")
        note = "" if here is None else (", the same as this installation's" if here == lock["sha256"]
                                        else ", not this installation's (replay may differ)")
        claims.append(("dependency lock", True, f"constraints.txt sha256 {_short(lock['sha256'])}... recorded{note}"))
    else:
        claims.append(("dependency lock", "reason" in lock, f"not recorded: {lock.get('reason', 'no reason given')}"))

    trace = pred.get("trace_index")
    if trace:
        from glassforge.release import folder_sha256

        got = folder_sha256(release / trace.get("folder", "trace"))
        claims.append(("trace index", got == trace.get("sha256"), "trace/ is the attested index" if got == trace.get("sha256")
                       else f"trace/ hashes to {_short(got)}... but attested {_short(trace.get('sha256'))}..."))
    return claims


def _check_replay_checkpoint(release: Path, pred: dict, chain: list[dict]) -> list[Claim]:
    claims: list[Claim] = []
    for it in pred.get("replay") or []:
        name = f"replay checkpoint {it.get('stage')}"
        if it.get("init_weights"):
            last_pre = [c for c in chain if c["stage"] == "pretrain"]
            path = release / it["init_weights"]
            ok = path.is_file() and bool(last_pre) and sha256_file(path) == last_pre[-1]["model_sha256"]
            claims.append((f"{name} init", ok, f"{it['init_weights']} is pretraining's last attested checkpoint"
                           if ok else f"{it['init_weights']} is missing or not pretraining's last attested weights"))
        if not it.get("start_checkpoint"):
            continue
        entry = next((c for c in chain if c["stage"] == it["stage"] and c["step"] == it["from_step"]), None)
        if entry is None:
            claims.append((name, False, f"step {it['from_step']} is not in the checkpoint chain"))
            continue
        folder = release / it["start_checkpoint"]
        bad = None
        for fname, key in (("model.safetensors", "model_sha256"), ("optimizer.safetensors", "optimizer_sha256"),
                           ("trainer.json", "trainer_sha256")):
            if not (folder / fname).is_file():
                bad = f"{it['start_checkpoint']}/{fname} is missing"
            elif sha256_file(folder / fname) != entry[key]:
                bad = f"{it['start_checkpoint']}/{fname} is not the attested step-{entry['step']} checkpoint's"
            if bad:
                break
        claims.append((name, bad is None, bad or f"{it['start_checkpoint']} is the attested "
                                                 f"{it['stage']} step-{entry['step']} checkpoint"))
    return claims


def _check_metrics(release: Path, pred: dict) -> list[Claim]:
    path = release / "metrics.jsonl"
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


def check_signature(release: Path, payload: bytes, public_key: Path | None) -> list[Claim]:
    from glassforge.attest import key_id, load_public_key, verify_envelope

    env_path = release / "attestation.dsse.json"
    if not env_path.is_file():
        if public_key is not None:
            return [("signature", False, "--public-key given but the release is not signed (no attestation.dsse.json)")]
        return []
    envelope, err = _load_json(env_path)
    if err:
        return [("signature", False, err)]
    if public_key is not None:
        key = load_public_key(public_key)
        source = f"--public-key {public_key}"
    elif (release / "signing_key.pub").is_file():
        try:
            key = load_public_key(release / "signing_key.pub")
        except UserError as e:
            return [("signature", False, f"signing_key.pub: {e}")]
        source = "the key shipped in signing_key.pub (pass --public-key to check it is one you trust)"
    else:
        return [("signature", False, "signed, but no key to check it: pass --public-key")]
    why = verify_envelope(envelope, payload, key)
    if why:
        return [("signature", False, why)]
    return [("signature", True, f"ed25519 signature by {key_id(key)[:19]}... verifies, with {source}")]


# --------------------------------------------------------------------------- --data RUN

def check_data(run_root: Path, pred: dict) -> list[Claim]:
    """The run's documents against its data manifest (the data stage's own checks), and both against the attestation."""
    from glassforge import data as data_module
    from glassforge.recipe import load_recipe
    from glassforge.runfolder import Run

    run = Run.open(run_root)
    attested = pred.get("data") or {}
    verify_data = getattr(data_module, "verify_data", None)
    if verify_data is None:
        raise UserError("--data needs glassforge.data.verify_data, which this glassforge lacks")
    claims: list[Claim] = [(f"data {name}", bool(ok), reason) for name, ok, reason in verify_data(run)]
    try:
        head = data_module.load_manifest(run)
    except (UserError, ValueError) as e:
        return claims + [("data manifest", False, str(e))]
    got = (head.get("merkle") or {}).get("mix")
    want = attested.get("mix_merkle_root")
    claims.append(("data root attested", got == want, f"the run's data mix Merkle root {_short(got)}... is the attested one"
                   if got == want else f"the run's data manifest has Merkle root {_short(got)}... but attested "
                                       f"{_short(want)}..."))
    got, want = head.get("order_sha256"), attested.get("order_sha256")
    claims.append(("data order attested", got == want, "the run's data order is the attested one" if got == want
                   else f"the run's order.txt hash {_short(got)}... but attested {_short(want)}..."))
    tok = sha256_file(run.tokenizer / "tokenizer.json") if (run.tokenizer / "tokenizer.json").is_file() else None
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


# --------------------------------------------------------------------------- --replay

def replay_training(release: Path, run_root: Path, pred: dict) -> list[Claim]:
    """Re-train each attested replay interval from the documents; compare with the chain, bit for bit.

    A scratch run gets the release's recipe and tokenizer and the run's
    documents.jsonl and order.txt; the shards stage re-tokenizes the documents
    there, so a changed document changes the training stream.
    """
    from glassforge.recipe import parse_recipe
    from glassforge.runfolder import Run
    from glassforge.shards import run_shards

    intervals = pred.get("replay") or []
    if not intervals:
        return [("replay", False, "the attestation records no replay interval")]
    recipe = parse_recipe((release / "recipe.toml").read_bytes(), "recipe.toml")
    source = Run.open(run_root)
    claims: list[Claim] = []
    with tempfile.TemporaryDirectory(prefix="glassforge-verify-") as tmp_name:
        tmp = Run(Path(tmp_name) / "run")
        tmp.data.mkdir(parents=True)
        tmp.tokenizer.mkdir()
        shutil.copyfile(release / "recipe.toml", tmp.recipe)
        # The shards stage also records token counts in the manifest, so it needs a copy too.
        for name in ("documents.jsonl", "order.txt", "manifest.json"):
            if not (source.data / name).is_file():
                return [("replay", False, f"{source.data / name} is missing")]
            shutil.copyfile(source.data / name, tmp.data / name)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(release / name, tmp.tokenizer / name)
        try:
            run_shards(tmp)
        except UserError as e:
            return [("replay", False, f"the documents do not make a training stream: {e}")]
        for it in intervals:
            try:
                claims.append(_replay_interval(release, tmp, recipe, pred, it))
            except UserError as e:
                claims.append((f"replay {it.get('stage')}", False, str(e)))
    return claims


def _replay_interval(release: Path, tmp, recipe, pred: dict, it: dict) -> Claim:
    from glassforge import train as train_module
    from glassforge.attest import platform_info

    stage, from_step, to_step = it["stage"], it["from_step"], it["to_step"]
    name = f"replay {stage}"
    target = next((c for c in pred.get("checkpoints") or [] if c["stage"] == stage and c["step"] == to_step), None)
    if target is None:
        return name, False, f"step {to_step} is not in the attested checkpoint chain"
    replay = getattr(train_module, "replay", None)
    if replay is None:
        raise UserError("--replay needs glassforge.train.replay, which this glassforge lacks")
    out = tmp.root.parent / f"out_{stage}"
    recipe_hash, seed = "replay", recipe.seed + (1 if stage == "sft" else 0)  # from step 0: the stages' seeds
    if it.get("start_checkpoint"):
        start = release / it["start_checkpoint"]
        shutil.copytree(start, out / "checkpoints" / start.name)
        meta = json.loads((start / "trainer.json").read_text())
        recipe_hash, seed = meta["recipe_hash"], meta.get("seed", seed)
    if stage == "pretrain":
        from glassforge.shards import TokenStream

        cfg = recipe.pretrain
        train_set = train_module.Windows(TokenStream(tmp.data, "train"), cfg.seq_len)
    elif stage == "sft":
        from glassforge.sft import Conversations, load_conversations
        from glassforge.tokenizer import load_tokenizer

        cfg = recipe.sft
        train_set = Conversations(load_conversations(tmp)[0], load_tokenizer(tmp.tokenizer), cfg.seq_len)
    else:
        return name, False, f"unknown stage {stage!r}"
    init = release / it["init_weights"] if it.get("init_weights") else None
    result = replay(out, recipe.model, train_set, cfg, seed, recipe_hash, from_step, to_step,
                    init_weights=init, workdir=tmp.root.parent)
    span = f"steps {from_step}..{to_step}"
    if result["model_sha256"] == target["model_sha256"] and result["optimizer_sha256"] == target["optimizer_sha256"]:
        ends = " (the released weights)" if target["model_sha256"] == _subject(release) else ""
        return name, True, (f"re-trained {span} from the documents: weights and optimiser state equal the attested "
                            f"step-{to_step} checkpoint{ends} bit for bit")
    key = "model_sha256" if result["model_sha256"] != target["model_sha256"] else "optimizer_sha256"
    which = "weights" if key == "model_sha256" else "optimiser state"
    from glassforge.attest import source_sha256

    elsewhere = ""
    if source_sha256() != (pred.get("code") or {}).get("source_sha256"):
        elsewhere = " (this glassforge's source differs from the attested code's, which can change the last bits)"
    elif platform_info() != pred.get("platform"):
        elsewhere = " (on another platform than the attested one, floating point may differ)"
    return name, False, (f"re-trained {span} from the documents give {which} {_short(result[key])}... but the "
                         f"attested step-{to_step} checkpoint has {_short(target[key])}...{elsewhere}")


def _subject(release: Path) -> str | None:
    path = release / "model.safetensors"
    return sha256_file(path) if path.is_file() else None


# --------------------------------------------------------------------------- entry points

@hashing_once()  # the manifest, attestation and replay checks each ask for the same files' hashes
def verify_release(release: Path, replay: bool = False, data_run: Path | None = None,
                   public_key: Path | None = None) -> list[Claim]:
    """Every claim about a release, each (name, passed, reason)."""
    release = Path(release)
    if not release.is_dir():
        raise UserError(f"{release}: no such release folder")
    if not (release / "manifest.json").exists() and (release / "release" / "manifest.json").is_file():
        release = release / "release"  # a run folder: its release
    if replay and data_run is None:
        raise UserError("--replay re-trains from the documents: give the run folder that holds them with --data RUN")
    manifest, err = _load_json(release / "manifest.json")
    if err:
        return [("manifest", False, err)]
    claims = check_files(release, manifest)
    stmt, err = _load_json(release / "attestation.json")
    if err:
        return claims + [("attestation", False, err)]
    claims += check_signature(release, (release / "attestation.json").read_bytes(), public_key)
    try:
        claims += check_attestation(release, stmt, manifest)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a hand-edited statement of the wrong shape
        return claims + [("attestation", False, f"attestation.json is malformed ({type(e).__name__}: {e})")]
    pred = stmt.get("predicate") or {}
    if data_run is not None:
        claims += check_data(Path(data_run), pred)
    if replay:
        claims += replay_training(release, Path(data_run), pred)
    return claims


def verify_command(release: Path, replay: bool, data_run: Path | None, public_key: Path | None) -> int:
    """Print each claim as PASS or FAIL with its reason; 0 if all pass, 1 otherwise."""
    claims = verify_release(Path(release), replay, Path(data_run) if data_run else None,
                            Path(public_key) if public_key else None)
    for name, ok, reason in claims:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {reason}", flush=True)
    failed = sum(not ok for _, ok, _ in claims)
    print(f"verify: {len(claims) - failed} of {len(claims)} claims pass" + (f", {failed} FAIL" if failed else ""))
    return 1 if failed else 0
