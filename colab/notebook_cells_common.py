"""Cell sources shared by several Colab notebooks (see colab/notebook_cells.py)."""

READ_METRICS = '''def read_metrics(workdir: str) -> list[dict]:
    """The rows of workdir/metrics.jsonl that train_and_evaluate wrote."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]'''
