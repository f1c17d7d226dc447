"""Run log: a progress bar (loss, tokens/s, expert load), a JSONL and a CSV log, and a loss
curve PNG at the end."""

from __future__ import annotations

import csv
import json
import pathlib

COLUMNS = ("step", "adapter", "loss", "aux", "lr", "tokens_per_s", "load")


def read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a log being resumed; a line cut off by a killed run is left out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunLog:
    def __init__(self, output: pathlib.Path, progress: bool = True, resume: bool = False):
        self.output, self.progress = output, progress
        self.bar = None
        output.mkdir(parents=True, exist_ok=True)
        path = output / "log.jsonl"
        self.rows: list[dict] = read_rows(path) if resume and path.exists() else []
        self.jsonl = open(path, "a" if resume else "w")

    def keep_until(self, micro_step: int) -> None:
        """Resuming from `micro_step`: forget later rows (that run's steps are re-run)."""
        self.rows = [row for row in self.rows if row["step"] <= micro_step]
        self.jsonl.seek(0)
        self.jsonl.truncate()
        self.jsonl.writelines(json.dumps(row) + "\n" for row in self.rows)
        self.jsonl.flush()

    def start(self, total: int, initial: int = 0) -> None:
        if self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step")

    def write(self, **row) -> None:
        self.rows.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.bar is not None:
            load = row["load"]
            spread = f"{max(load) / max(min(load), 1e-9):.1f}x" if load else "-"
            self.bar.set_postfix_str(f"{row['adapter']} loss {row['loss']:.3f} "
                                     f"{row['tokens_per_s']:.0f} tok/s load max/min {spread}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()

    def finish(self, results: dict[str, dict[str, float]]) -> None:
        """Write log.csv, loss.png and eval.json from the whole run."""
        with open(self.output / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({**row, "load": " ".join(f"{v:.3f}" for v in row["load"])})
        if results:
            (self.output / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        self.plot()

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["adapter"] for r in self.rows):
            points = [(r["step"], r["loss"]) for r in self.rows if r["adapter"] == name]
            ax.plot(*zip(*points), label=name)
        ax.set_xlabel("micro-step")
        ax.set_ylabel("training loss (CE)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.output / "loss.png", dpi=100)
        plt.close(fig)
