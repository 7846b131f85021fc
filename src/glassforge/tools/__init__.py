"""Tools over a run folder that no stage needs: `data inspect` (a document, token or step) and
`report` (one self-contained HTML file of a run)."""
