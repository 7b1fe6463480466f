"""Fine-tune the text encoder on the shop's own judged train queries (contrastive, on CPU).

Each training example is a train query, one of its judged products as the positive (drawn in
proportion to its gain) and one hard negative from the served candidate pool: a product the lexical
retriever ranks high for the query that is judged worse than the positive or not judged at all. The
loss is InfoNCE over the batch's positives and hard negatives (every other query's products are
negatives too). Dev queries never reach this module. The result is cached under a key of every
input, so a rebuild of the same data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from shopserve.ensemble.lexical import LexicalIndex, top_rows
from tqdm.auto import tqdm

from .cache import cache_key, cache_root
from .data import Judgments
from .threads import every_core

log = logging.getLogger("shopserve.export.finetune")

CHECKPOINT_DIR = "model"
REPORT_FILE = "finetune.json"


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 3e-5
    warmup_fraction: float = 0.1
    scale: float = 20.0  # inverse temperature of the InfoNCE softmax over cosines
    negative_depth: int = 30  # hard negatives come from the lexical top-N of each query
    max_title_tokens: int = 48
    time_budget_s: float = 600.0  # training stops here even mid-epoch (2 cores)
    seed: int = 13

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneReport:
    base_model: str
    data_fingerprint: str
    options: dict
    train_queries: int
    examples: int
    steps: int
    seconds: float
    stopped_by_budget: bool
    final_loss: float | None  # mean of the last 20 steps; None when none ran
    cache_key: str
    checkpoint: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Example:
    query: str
    positive: int  # catalogue row
    negative: int  # catalogue row


def examples_for(
    judgments: Judgments,
    product_ids: np.ndarray,
    lexical: LexicalIndex,
    depth: int,
    rng: np.random.Generator,
) -> list[Example]:
    """One example per train query that has a positive: a judged product drawn by gain, and a
    hard negative among the lexical top-``depth`` and the judged products graded below it."""
    row_of = {pid: row for row, pid in enumerate(product_ids.tolist())}
    examples = []
    for query in judgments.queries:
        gains = judgments.gains(query)
        judged = list(gains)
        weights = np.array([gains[p] for p in judged], dtype=np.float64)
        if weights.sum() <= 0:
            continue
        positive = judged[rng.choice(len(judged), p=weights / weights.sum())]
        best = gains[positive]
        pool = top_rows(lexical.scores(lexical.analyze(query)), depth)
        negatives = [int(row) for row in pool if gains.get(int(product_ids[row]), -1.0) < best] + [
            row_of[p] for p in judged if gains[p] < best
        ]
        if negatives:
            examples.append(
                Example(query, row_of[positive], negatives[rng.integers(len(negatives))])
            )
    return examples


def data_fingerprint(judgments: Judgments, titles: list[str]) -> str:
    """sha256 over the train judgments and the catalogue titles: what the training reads."""
    digest = hashlib.sha256()
    for query in judgments.queries:
        digest.update(json.dumps([query, sorted(judgments.gains(query).items())]).encode())
    for title in titles:
        digest.update(title.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _base_digest(base: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(base.rglob("*")):
        if path.is_file() and path.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def finetune(
    base: Path,
    train: Judgments,
    product_ids: np.ndarray,
    titles: list[str],
    lexical: LexicalIndex,
    options: FinetuneOptions,
) -> tuple[Path, FinetuneReport]:
    """The fine-tuned checkpoint (a Hugging Face model folder) and its report, from the cache when
    the same base model, data and settings were trained before (and no time budget stopped that
    run short of this one's)."""
    fingerprint = data_fingerprint(train, titles)
    # The time budget is not part of the key: a run it did not stop serves any budget.
    settings = {k: v for k, v in options.as_dict().items() if k != "time_budget_s"}
    key = cache_key(_base_digest(base), fingerprint, settings)
    entry = cache_root("finetune") / key
    if (entry / REPORT_FILE).exists():
        cached = FinetuneReport(**json.loads((entry / REPORT_FILE).read_text()))
        if not cached.stopped_by_budget or cached.seconds >= options.time_budget_s:
            log.info("fine-tuned encoder from the cache: %s", entry)
            return entry / CHECKPOINT_DIR, cached
        log.info("the cached fine-tuning was cut short by a smaller time budget: training again")
    rng = np.random.default_rng(options.seed)
    examples = examples_for(train, product_ids, lexical, options.negative_depth, rng)
    if not examples:
        raise ValueError("no train query has a judged product above another: nothing to learn")
    staging = entry.with_name(entry.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    steps, seconds, stopped, loss = _train(
        base, examples, titles, options, staging / CHECKPOINT_DIR
    )
    report = FinetuneReport(
        base_model=str(base),
        data_fingerprint=fingerprint,
        options=options.as_dict(),
        train_queries=len(train),
        examples=len(examples),
        steps=steps,
        seconds=round(seconds, 1),
        stopped_by_budget=stopped,
        final_loss=None if loss is None else round(loss, 4),
        cache_key=key,
        checkpoint=str(entry / CHECKPOINT_DIR),
    )
    (staging / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2))
    shutil.rmtree(entry, ignore_errors=True)
    staging.rename(entry)
    log.info("fine-tuned encoder cached at %s: %s", entry, report)
    return entry / CHECKPOINT_DIR, report


def _train(
    base: Path,
    examples: list[Example],
    titles: list[str],
    options: FinetuneOptions,
    destination: Path,
) -> tuple[int, float, bool, float | None]:
    """InfoNCE training; returns (steps, seconds, stopped by the time budget, last mean loss)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(options.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModel.from_pretrained(str(base))
    model.train()
    order_rng = np.random.default_rng(options.seed)
    batches_per_epoch = math.ceil(len(examples) / options.batch_size)
    total = batches_per_epoch * options.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate)
    warmup = max(1, int(total * options.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup))),
    )

    def embed(texts: list[str], max_length: int) -> torch.Tensor:
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    def train_on(batch: list[Example]) -> float:
        """One optimiser step on a batch (in-batch and hard negatives); its loss."""
        queries = embed([e.query for e in batch], 32)
        products = embed(
            [titles[e.positive] for e in batch] + [titles[e.negative] for e in batch],
            options.max_title_tokens,
        )
        logits = options.scale * queries @ products.T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        return loss.item()

    with every_core() as threads:
        log.info("fine-tuning on %d threads", threads)
        started = time.monotonic()
        steps, stopped, recent = 0, False, []
        progress = tqdm(total=total, desc="fine-tune encoder", unit="step")
        for _ in range(options.epochs):
            order = order_rng.permutation(len(examples))
            for start in range(0, len(order), options.batch_size):
                if time.monotonic() - started > options.time_budget_s:
                    stopped = True
                    break
                batch = [examples[i] for i in order[start : start + options.batch_size]]
                steps += 1
                recent = [*recent[-19:], train_on(batch)]
                progress.update()
                progress.set_postfix(loss=f"{np.mean(recent):.3f}")
            if stopped:
                log.warning(
                    "fine-tuning stopped by its time budget (%.0f s) after %d of %d steps",
                    options.time_budget_s,
                    steps,
                    total,
                )
                break
    progress.close()
    model.eval()
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(destination))
    tokenizer.save_pretrained(str(destination))
    loss = float(np.mean(recent)) if recent else None
    return steps, time.monotonic() - started, stopped, loss
