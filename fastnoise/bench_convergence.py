"""``python -m fastnoise bench --convergence``: does fastnoise train like the stock hook?

A tiny Llama (built from a config, no download) is fine-tuned by a real transformers ``Trainer``
on a small instruction set generated here (prompt + response, right-padded, labels -100 on
the prompt and the padding), K seeds per configuration:

- ``none``: no noise;
- ``stock``: transformers' own NEFTune hook (``TrainingArguments.neftune_noise_alpha``);
- ``neftune``: the same key with ``fastnoise.override_hf_neftune()`` (fastnoise's fused noise);
- ``gaussian`` and ``symnoise``: ``FastNoiseCallback``;

each with NoisyTune (``FastNoiseCallback(noisytune_lam=...)``, before step 0) off and on. A
seed fixes the initial model, the data order and the NoisyTune draw, so configurations of one
seed differ only by their noise. Each run's train loss at every step and its held-out loss
every few steps go to a CSV, one row per run; a run already in the CSV (same sizes) is
skipped, so a cut-off run resumes where it stopped. The plot has one column per method: train
loss, held-out loss (mean over seeds and a min-max band; the stock hook in grey in every
column), and the held-out loss minus the stock hook's of the same seed (mean, 90% interval,
the TOST margin). The summary is the final losses per configuration and paired tests over
seeds (:func:`fastnoise.stats.paired_test`): TOST of fastnoise NEFTune vs the stock hook
against the margins fixed in ``MARGINS``, and every method vs no noise.

The same data set, model and training loop are the ones tests/test_convergence.py runs
smaller.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

# --------------------------------------------------------------------------------------
# Data: instruction-style examples over a character vocabulary
# --------------------------------------------------------------------------------------
LETTERS = "abcdefgh"
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789:=+."
PAD = len(CHARS)          # one id per character, then padding
VOCAB = PAD + 1
LENGTH = 24               # every example is padded to this many tokens


def make_examples(n: int, seed: int) -> List[tuple]:
    """``n`` (prompt, response) pairs of four small tasks: reverse, sort, add, count."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        task = rng.choice(("rev", "sort", "add", "count"))
        if task == "add":
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            prompt, response = f"add:{a}+{b}=", str(a + b)
        else:
            word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
            prompt = f"{task}:{word}="
            response = {"rev": word[::-1], "sort": "".join(sorted(word)),
                        "count": str(len(word))}[task]
        examples.append((prompt, response + "."))
    return examples


class InstructionData(torch.utils.data.Dataset):
    """Token ids right-padded to ``LENGTH``, the attention mask, and labels that are -100 on
    the prompt and the padding (the loss is on the response only)."""

    def __init__(self, examples: Sequence[tuple]):
        n = len(examples)
        self.input_ids = torch.full((n, LENGTH), PAD, dtype=torch.long)
        self.attention_mask = torch.zeros((n, LENGTH), dtype=torch.long)
        self.labels = torch.full((n, LENGTH), -100, dtype=torch.long)
        for row, (prompt, response) in enumerate(examples):
            ids = [CHARS.index(c) for c in prompt + response]
            if len(ids) > LENGTH:
                raise ValueError(f"example {prompt + response!r} is longer than {LENGTH}")
            self.input_ids[row, :len(ids)] = torch.tensor(ids)
            self.attention_mask[row, :len(ids)] = 1
            self.labels[row, len(prompt):len(ids)] = torch.tensor(ids[len(prompt):])

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.labels[i]}


# --------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """Sizes of one experiment (the tests use a smaller one than the bench)."""
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    batch: int = 16
    steps: int = 120
    eval_every: int = 10
    lr: float = 3e-3
    n_eval: int = 128
    #: 1, not NEFTune's usual 5: at d = 64 and L = 24, alpha = 5 gives noise of 0.13, six times
    #: the embeddings' scale (0.02 at init), far outside NEFTune's regime (alpha = 5 at d = 4096,
    #: L = 512 is 0.0035); alpha = 1 (0.026) is about their size and still raises the loss
    #: clearly (~0.08 nats after 120 steps)
    alpha: float = 1.0
    noisytune_lam: float = 0.15

    def key(self) -> str:
        """The sizes as one string: CSV rows of other sizes are not reused on resume."""
        return (f"h{self.hidden}-l{self.layers}-b{self.batch}-s{self.steps}-e{self.eval_every}"
                f"-lr{self.lr:g}-a{self.alpha:g}-nt{self.noisytune_lam:g}")


def tiny_llama(setup: Setup, seed: int, dtype: torch.dtype = torch.float32):
    """A Llama-like model from a config; ``seed`` fixes its initial weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=setup.hidden,
                         intermediate_size=2 * setup.hidden, num_hidden_layers=setup.layers,
                         num_attention_heads=setup.heads,
                         num_key_value_heads=max(1, setup.heads // 2),
                         max_position_embeddings=2 * LENGTH, pad_token_id=PAD,
                         tie_word_embeddings=False)
    with _fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(dtype)


@contextlib.contextmanager
def _fork_rng():
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def datasets(setup: Setup, seed: int = 0) -> tuple:
    """(train, held-out): disjoint examples; the train set covers every step once (one epoch,
    so no sampler is re-seeded from a generator the noise has advanced)."""
    train = make_examples(setup.steps * setup.batch, seed)
    seen = set(train)
    held_out = [e for e in make_examples(4 * setup.n_eval, seed + 1) if e not in seen]
    return InstructionData(train), InstructionData(held_out[:setup.n_eval])


@dataclass
class Curves:
    """What one run logged: the train loss of every step, the held-out loss every few."""
    train: List[float] = field(default_factory=list)
    eval_steps: List[int] = field(default_factory=list)
    eval: List[float] = field(default_factory=list)


def _recorder(curves: Curves):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:  # logging_steps=1: this step's loss, exactly
                curves.train.append(float(logs["loss"]))
            if "eval_loss" in logs:
                curves.eval_steps.append(state.global_step)
                curves.eval.append(float(logs["eval_loss"]))

    return Recorder()


def train(model, train_set, eval_set, setup: Setup, seed: int, *, callbacks=(),
          neftune_noise_alpha: Optional[float] = None, use_cpu: bool = True) -> Curves:
    """Fine-tune ``model`` in place with a transformers ``Trainer`` (AdamW, linear decay,
    ``setup.steps`` steps of ``setup.batch``), seeded by ``seed``; returns its losses."""
    import tempfile

    import transformers

    eval_every = setup.eval_every
    curves = Curves()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=setup.steps, per_device_train_batch_size=setup.batch,
            per_device_eval_batch_size=setup.n_eval, learning_rate=setup.lr,
            weight_decay=0.01, warmup_steps=0, lr_scheduler_type="linear", seed=seed,
            data_seed=seed, logging_steps=1, eval_strategy="steps" if eval_every else "no",
            eval_steps=eval_every or None, save_strategy="no", report_to=[], use_cpu=use_cpu,
            disable_tqdm=True, dataloader_num_workers=0,
            neftune_noise_alpha=neftune_noise_alpha)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set,
                                       eval_dataset=eval_set if eval_every else None,
                                       callbacks=[*callbacks, _recorder(curves)])
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        trainer.train()
    return curves


# --------------------------------------------------------------------------------------
# The benchmark: configurations x seeds, a resumable CSV, a summary and a plot
# --------------------------------------------------------------------------------------
#: the columns of the plot, in order; "stock" is also drawn in every other column
METHODS = ("none", "stock", "neftune", "gaussian", "symnoise")
LABELS = {"none": "no noise", "stock": "stock HF NEFTune hook",
          "neftune": "fastnoise NEFTune (override_hf_neftune)",
          "gaussian": "fastnoise Gaussian", "symnoise": "fastnoise SymNoise pair"}
DEFAULT = Setup()
QUICK = Setup(steps=40, eval_every=10)
SEEDS, QUICK_SEEDS = 16, 3
#: TOST equivalence margins (nats) of fastnoise NEFTune vs the stock hook, declared before the
#: first full run from a pilot on seeds 100-105 (DEFAULT sizes): the noise raised the final
#: losses by 0.07-0.09 nats over no noise, and the paired SD of fastnoise - stock was 0.029
#: (train) and 0.035 (held-out) with one seed at -0.07. 0.03 nats is about a third of the
#: noise's own effect and 2% of the loss; with SD 0.035, 16 seeds pass at 5% with ~90%
#: probability when the true difference is 0.
MARGINS = {"train": 0.03, "eval": 0.03}
FIELDS = ("setup", "method", "noisytune", "seed", "train", "eval_steps", "eval")


def run_one(setup: Setup, method: str, noisytune: bool, seed: int, device: torch.device,
            data: tuple) -> Curves:
    """One training run of ``method`` ("none", "stock", "neftune", "gaussian", "symnoise")."""
    from .trainer import FastNoiseCallback, override_hf_neftune, restore_hf_neftune

    model = tiny_llama(setup, seed).to(device)
    lam = setup.noisytune_lam if noisytune else None
    callbacks, hf_alpha = [], None
    if method in ("stock", "neftune"):
        hf_alpha = setup.alpha  # TrainingArguments.neftune_noise_alpha, as users set it
        if lam is not None:
            callbacks.append(FastNoiseCallback(None, noisytune_lam=lam, seed=seed))
    elif method == "none":
        if lam is not None:
            callbacks.append(FastNoiseCallback(None, noisytune_lam=lam, seed=seed))
    else:
        callbacks.append(FastNoiseCallback(method, alpha=setup.alpha, noisytune_lam=lam,
                                           seed=seed))
    if method == "neftune":
        override_hf_neftune()
    try:
        return train(model, *data, setup, seed, callbacks=callbacks,
                     neftune_noise_alpha=hf_alpha, use_cpu=device.type == "cpu")
    finally:
        if method == "neftune":
            restore_hf_neftune()


def read_csv(path: str, setup: Setup) -> Dict[tuple, Curves]:
    """The complete runs of ``setup`` already in ``path``: {(method, noisytune, seed): curves}.

    One row per run: its train loss at every step, the held-out steps and losses, each a
    space-separated list (9 significant digits: a float32 loss read back as float32 is exact)."""
    runs: Dict[tuple, Curves] = {}
    if not os.path.exists(path):
        return runs
    n_evals = setup.steps // setup.eval_every if setup.eval_every else 0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                if row["setup"] != setup.key():
                    continue
                curves = Curves([float(x) for x in row["train"].split()],
                                [int(x) for x in row["eval_steps"].split()],
                                [float(x) for x in row["eval"].split()])
                key = (row["method"], row["noisytune"] == "1", int(row["seed"]))
            except (AttributeError, KeyError, TypeError, ValueError):
                continue  # a line cut short by an interrupted write
            if len(curves.train) == setup.steps and len(curves.eval) == n_evals:
                runs[key] = curves
    return runs


def append_csv(path: str, setup: Setup, key: tuple, curves: Curves) -> None:
    """A finished run's row (a run is in the CSV whole or not at all)."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    method, noisytune, seed = key
    numbers = lambda values: " ".join(f"{v:.9g}" for v in values)  # noqa: E731
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(FIELDS)
        writer.writerow((setup.key(), method, int(noisytune), seed, numbers(curves.train),
                         " ".join(str(s) for s in curves.eval_steps), numbers(curves.eval)))


def final_losses(curves: Curves) -> tuple:
    """(train, eval): the logged train loss averaged over the last quarter of the steps (one
    step's loss is one noisy batch), and the held-out loss after the last step."""
    tail = curves.train[-max(1, len(curves.train) // 4):]
    return sum(tail) / len(tail), curves.eval[-1]


def summarize(runs: Dict[tuple, Curves], seeds: Sequence[int], margins=MARGINS) -> str:
    """The table of final losses per configuration, and the paired tests over seeds."""
    from .stats import paired_test

    finals = {}
    for (method, noisytune, seed), curves in runs.items():
        if seed in seeds:
            finals.setdefault((method, noisytune), {})[seed] = final_losses(curves)
    lines = ["| method | NoisyTune | seeds | final train loss (mean ± sd) | final held-out "
             "loss (mean ± sd) |", "|---|---|---|---|---|"]
    for method in METHODS:
        for noisytune in (False, True):
            per_seed = finals.get((method, noisytune), {})
            if not per_seed:
                continue
            cols = []
            for k in range(2):
                values = [v[k] for v in per_seed.values()]
                mean = sum(values) / len(values)
                sd = (math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
                      if len(values) > 1 else float("nan"))
                cols.append(f"{mean:.4f} ± {sd:.4f}")
            lines.append(f"| {LABELS[method]} | {'on' if noisytune else 'off'} | "
                         f"{len(per_seed)} | {cols[0]} | {cols[1]} |")
    lines += ["", "Paired over seeds (same initial model, data order and NoisyTune draw; only "
              "the noise stream differs). TOST at 5%: equivalent when the 90% interval of the "
              "mean difference lies inside ± the margin.", "",
              "| comparison | NoisyTune | loss | mean difference | 90% CI | p (differ) | "
              "margin | TOST p | equivalent |", "|---|---|---|---|---|---|---|---|---|"]
    pairs = [("neftune", "stock", True)] + [(m, "none", False) for m in METHODS if m != "none"]
    for a, b, with_margin in pairs:
        for noisytune in (False, True):
            fa, fb = finals.get((a, noisytune), {}), finals.get((b, noisytune), {})
            common = sorted(set(fa) & set(fb))
            if len(common) < 2:
                continue
            for k, loss in enumerate(("train", "eval")):
                margin = margins[loss] if with_margin else float("nan")
                r = paired_test([fa[s][k] for s in common], [fb[s][k] for s in common],
                                margin=margin)
                eq = ("yes" if r.equivalent() else "no") if with_margin else ""
                lines.append(
                    f"| {a} − {b} | {'on' if noisytune else 'off'} | {loss} | {r.mean:+.4f} | "
                    f"{r.ci90[0]:+.4f} .. {r.ci90[1]:+.4f} | {r.p_differ:.2g} | "
                    f"{margin if with_margin else ''} | "
                    f"{f'{r.p_equivalent:.2g}' if with_margin else ''} | {eq} |")
    return "\n".join(lines)


def _band(curve_lists):
    import numpy as np

    a = np.asarray(curve_lists, dtype=float)
    return a.mean(0), a.min(0), a.max(0)


def _smooth(values, window: int):
    """Trailing moving average (one step's loss is one batch: noisy)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) < window:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    head = c[1:window] / np.arange(1, window)
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def write_plot(runs: Dict[tuple, Curves], seeds: Sequence[int], setup: Setup, path: str,
               title: str, margins=MARGINS) -> None:
    """One column per method: train loss (top), held-out loss (middle), NoisyTune off and on,
    the stock hook in grey (means over seeds, bands min..max); bottom: the held-out loss minus
    the stock hook's of the same seed and NoisyTune setting (mean and its 90% interval, the
    TOST margin dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .stats import t_quantile

    window = max(1, setup.steps // 20)
    fig, axes = plt.subplots(3, len(METHODS), figsize=(4 * len(METHODS), 10), sharey="row",
                             squeeze=False)
    colors = {False: "tab:blue", True: "tab:orange"}

    def draw(ax, method, noisytune, split, color, label, style="-"):
        curves = [runs[(method, noisytune, s)] for s in seeds if (method, noisytune, s) in runs]
        if not curves:
            return
        if split == "train":
            x = list(range(1, setup.steps + 1))
            mean, lo, hi = _band([_smooth(c.train, window) for c in curves])
        else:
            x = curves[0].eval_steps
            mean, lo, hi = _band([c.eval for c in curves])
        ax.plot(x, mean, style, color=color, lw=1.4, label=f"{label} (n={len(curves)})")
        ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)

    def draw_difference(ax, method, noisytune):
        common = [s for s in seeds if (method, noisytune, s) in runs
                  and ("stock", noisytune, s) in runs]
        if len(common) < 2:
            return
        d = np.asarray([np.subtract(runs[(method, noisytune, s)].eval,
                                    runs[("stock", noisytune, s)].eval) for s in common])
        mean = d.mean(0)
        half = t_quantile(0.95, len(common) - 1) * d.std(0, ddof=1) / math.sqrt(len(common))
        x = runs[(method, noisytune, common[0])].eval_steps
        ax.plot(x, mean, color=colors[noisytune], lw=1.4,
                label=f"NoisyTune {'on' if noisytune else 'off'} (n={len(common)})")
        ax.fill_between(x, mean - half, mean + half, color=colors[noisytune], alpha=0.2, lw=0)

    for col, method in enumerate(METHODS):
        for row, split in enumerate(("train", "eval")):
            ax = axes[row][col]
            if method != "stock":
                draw(ax, "stock", False, split, "0.45", "stock hook, NoisyTune off", "--")
            for nt in (False, True):
                draw(ax, method, nt, split, colors[nt],
                     f"NoisyTune {'on' if nt else 'off'}")
            what = "train loss" if split == "train" else "held-out loss"
            ax.set_title(f"{LABELS[method]}\n{what}", fontsize=9)
        ax = axes[2][col]
        ax.axhline(0.0, color="0.45", ls="--", lw=1)
        if method == "stock":
            ax.text(0.5, 0.5, "the other columns' held-out loss\nminus this hook's",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set_xticks([])
        else:
            for sign in (-1, 1):
                ax.axhline(sign * margins["eval"], color="0.3", ls=":", lw=1)
            for nt in (False, True):
                draw_difference(ax, method, nt)
            ax.set_title(f"{LABELS[method]}\nheld-out loss − stock hook's (same seed)",
                         fontsize=9)
        for row in range(3):
            axes[row][col].set_xlabel("step")
            axes[row][col].grid(alpha=0.3)
            if axes[row][col].get_legend_handles_labels()[0]:
                axes[row][col].legend(fontsize=6)
    axes[0][0].set_ylabel(f"train loss ({window}-step moving average)")
    axes[1][0].set_ylabel("held-out loss")
    axes[2][0].set_ylabel(f"difference (nats): mean, 90% CI; ±{margins['eval']:g} dotted")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def main(args, device: torch.device, header: str) -> int:
    """``python -m fastnoise bench --convergence [--quick] [--csv PATH] [--plot PATH]``."""
    import gc

    import transformers

    setup, n_seeds = (QUICK, QUICK_SEEDS) if args.quick else (DEFAULT, SEEDS)
    seeds = list(range(n_seeds))
    csv_path = args.csv or "convergence.csv"
    plot_path = args.plot or os.path.splitext(csv_path)[0] + ".png"
    todo = [(m, nt, s) for s in seeds for m in METHODS for nt in (False, True)]
    runs = read_csv(csv_path, setup)
    done = [k for k in todo if k in runs]
    print(f"convergence: tiny Llama (hidden {setup.hidden}, {setup.layers} layers, vocab "
          f"{VOCAB}), {setup.steps} steps of {setup.batch} x {LENGTH} tokens, AdamW lr "
          f"{setup.lr:g}, alpha {setup.alpha:g}, NoisyTune lambda {setup.noisytune_lam:g}; "
          f"{len(METHODS)} methods x NoisyTune off/on x {n_seeds} seeds = {len(todo)} runs "
          f"({len(done)} already in {csv_path}), transformers {transformers.__version__}",
          flush=True)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model: one thread is faster than several
    transformers.logging.set_verbosity_error()
    data = datasets(setup)
    frozen_before = gc.get_freeze_count()
    gc.collect()
    gc.freeze()  # accelerate gc.collect()s after every run: skip the objects alive now
    start, timed = time.perf_counter(), 0
    try:
        for key in todo:
            if key in runs:
                continue
            method, noisytune, seed = key
            curves = run_one(setup, method, noisytune, seed, device, data)
            append_csv(csv_path, setup, key, curves)
            runs[key] = curves
            timed += 1
            elapsed = time.perf_counter() - start
            left = elapsed / timed * sum(1 for k in todo if k not in runs)
            train_loss, eval_loss = final_losses(curves)
            print(f"  [{sum(1 for k in todo if k in runs):3d}/{len(todo)}] {method:9s} "
                  f"NoisyTune {'on ' if noisytune else 'off'} seed {seed:2d}: final train "
                  f"{train_loss:.4f}, held-out {eval_loss:.4f}  ({_fmt_time(elapsed)} elapsed, "
                  f"~{_fmt_time(left)} left)", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"interrupted: the {timed} finished runs are in {csv_path}; run again to resume",
              file=sys.stderr)
    finally:
        if not frozen_before:  # a caller's freeze stays the caller's to undo
            gc.unfreeze()
        torch.set_num_threads(threads)
    print(summarize(runs, seeds))
    write_plot(runs, seeds, setup, plot_path,
               f"{header}: fastnoise vs the stock NEFTune hook, {setup.steps} steps, alpha "
               f"{setup.alpha:g}; losses: mean and min..max over seeds; differences: mean and "
               f"90% CI")
    print(f"wrote {csv_path} and {plot_path}")
    return 0
