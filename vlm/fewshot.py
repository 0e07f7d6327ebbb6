"""Few-shot evaluation of a Flamingo (``vlm eval``, in :mod:`vlm.cli`), as OpenFlamingo's eval suite runs it;
docs/eval.md has the protocol and the JSON.

Each query of the evaluation split gets k solved examples from a support pool (the train split), in the layout the
model trained on: drawn at random (:func:`random_select`) or retrieved by CLIP similarity, the most similar last
(:func:`rices_select`, OpenFlamingo's ``RICES.find`` order); never the query's own image (:func:`exclusions`).
``vqa`` answers with :meth:`~vlm.generation.Captioner.generate_answers` (:func:`vlm.vqa.vqa_metrics`), ``caption``
generates after :func:`~vlm.generation.few_shot_prompt` (:func:`vlm.captions.caption_scores`), ``classify`` ranks the
class names by their continuation's mean log-probability (:func:`class_log_likelihoods`: OpenFlamingo's
``get_rank_classifications`` with ``normalize_length=True``). A shot count whose prompts do not fit the decoder's
context is reported with its token length and not run; nothing is truncated.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from vlm.captions import caption_scores
from vlm.data.datasets import resolve_image
from vlm.data.prefetch import model_inputs
from vlm.data.sources import IMAGE_FALLBACKS, LABEL_FALLBACKS, TEXT_FALLBACKS, load_table, pick_column
from vlm.data.vqa import HELDOUT_COLUMN, is_question_table, question_table
from vlm.generation import few_shot_prompt
from vlm.index import embed_files, fingerprint, load_clip, load_index
from vlm.inference import CaptionPredictor
from vlm.inputs import printable
from vlm.vqa import vqa_metrics, vqa_score

TASKS = ("caption", "vqa", "classify")
SELECTS = ("random", "rices")
METRICS = {"caption": "cider", "vqa": "vqa_accuracy", "classify": "accuracy"}  # the headline metric of each task


class FewShotError(ValueError):
    """A folder, checkpoint, index or option that is the user's to fix; the message is one line."""


@dataclass
class Item:
    """A query or a demonstration: its image, the text a demonstration shows after it (caption, answer or class
    name), what a prediction is scored against, and for VQA the question and the held-out flag."""

    path: Path
    text: str
    references: list[str]
    question: str = ""
    heldout: bool | None = None


def _say(message: str) -> None:
    tqdm.write(printable(message), file=sys.stderr)


# ------------------------------------------------------------------------------------------------------ data
def read_items(task: str, folder: str | os.PathLike) -> list[Item]:
    """The rows of a split as :class:`Item` s, read by :func:`vlm.data.sources.load_table` (the reader training
    uses): VQA records (docs/vqa.md) for ``vqa``, one item per image with all its captions as references for
    ``caption``, labelled images (a ``label`` column or class sub-folders) for ``classify``. Rows without a text are
    left out."""
    root = Path(folder)
    if not root.is_dir():
        raise FewShotError(f"{folder} is not a folder")
    table = load_table(str(root), "validation")
    data, columns, source = table.data, list(table.data.column_names), str(folder)
    if task == "vqa":
        if not is_question_table(columns):
            raise FewShotError(f"{folder}: no 'question' column, so not VQA records (see docs/vqa.md)")
        data, _ = question_table(data, columns, source)
        columns = list(data.column_names)
    paths = [_image_path(v, table.root, source) for v in data[pick_column(columns, "image", IMAGE_FALLBACKS, "image",
                                                                         source)][:]]  # fmt: skip
    if task == "vqa":
        flags = data[HELDOUT_COLUMN][:] if HELDOUT_COLUMN in columns else [None] * len(paths)
        rows = zip(paths, data["answer"][:], data["answers"][:], data["question"][:], flags)
        return [Item(p, a, list(refs), q, None if h is None else bool(h)) for p, a, refs, q, h in rows if a and refs]
    if task == "classify":
        try:
            labels = data[pick_column(columns, "label", LABEL_FALLBACKS, "label", source)][:]
        except ValueError:
            raise FewShotError(f"{folder}: no labels (a 'label' column, or class sub-folders)") from None
        return [Item(p, str(v).strip(), [str(v).strip()]) for p, v in zip(paths, labels) if v is not None
                and str(v).strip()]  # fmt: skip
    texts = (data["captions"][:] if "captions" in columns else
             [[c] for c in data[pick_column(columns, "caption", TEXT_FALLBACKS, "caption", source)][:]])
    by_image: dict[Path, list[str]] = {}
    for path, captions in zip(paths, texts):  # rows naming the same image add references, in first-seen order
        kept = [c.strip() for c in (captions or []) if isinstance(c, str) and c.strip()]
        if kept:
            by_image.setdefault(path, []).extend(kept)
    return [Item(p, refs[0], refs) for p, refs in by_image.items()]


def _image_path(value: Any, root: Path | None, source: str) -> Path:
    name, where = resolve_image(value, root)
    if not isinstance(where, Path):
        raise FewShotError(f"{source}: image {name} is not a file path (vlm eval reads images from files)")
    return where


def class_names(folder: str | os.PathLike, *splits: Sequence[Item]) -> list[str]:
    """The candidate classes: ``classnames.txt`` in the folder or next to it (as training reads it), else the
    sorted labels; labels the file lacks are added (sorted), so every query's class is a candidate."""
    labels = sorted({item.text for split in splits for item in split})
    for place in (Path(folder), Path(folder).parent):
        if (place / "classnames.txt").is_file():
            names = [line.strip() for line in (place / "classnames.txt").read_text("utf-8").splitlines()
                     if line.strip()]  # fmt: skip
            return list(dict.fromkeys(names)) + [label for label in labels if label not in names]
    return labels


def exclusions(queries: Sequence[Item], support: Sequence[Item]) -> list[set[int]]:
    """For each query, the support indices that show the same image: the same resolved path or the same file
    content (SHA-256), so a query is never its own example, even when the support pool is the evaluation split."""
    digests: dict[Path, str | None] = {}

    def keys(path: Path) -> list[str]:
        resolved = path.resolve()
        if resolved not in digests:
            try:
                with open(resolved, "rb") as f:
                    digests[resolved] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError:
                digests[resolved] = None
        return [str(resolved)] + ([f"sha256:{digests[resolved]}"] if digests[resolved] else [])

    owners: dict[str, set[int]] = defaultdict(set)
    for j, item in enumerate(support):
        for key in keys(item.path):
            owners[key].add(j)
    return [set().union(*(owners.get(key, set()) for key in keys(q.path))) for q in queries]


# ------------------------------------------------------------------------------------------------ selection
def random_select(pool_size: int, k: int, excluded: Sequence[set[int]], seed: int, trial: int) -> list[list[int]]:
    """k distinct support indices per query, none in its ``excluded`` set, in the order drawn, from a generator
    seeded with ``(seed, trial, k)``: the same for a seed, different across trials, and independent of which other
    shot counts run. Raises ``ValueError`` when a query has fewer than k examples to draw from."""
    rng = np.random.default_rng([seed, trial, k])
    out = []
    for banned in excluded:
        if pool_size - len(banned) < k:
            raise ValueError(f"the support pool has {pool_size - len(banned)} examples besides the query, {k} needed")
        drawn = rng.choice(pool_size, size=min(pool_size, k + len(banned)), replace=False)
        out.append([int(j) for j in drawn if int(j) not in banned][:k])
    return out


def rices_select(queries: Tensor, support: Tensor, k: int, excluded: Sequence[set[int]]) -> list[list[int]]:
    """The k support rows most similar to each query (cosine of unit embeddings: ``queries`` (m, d) against
    ``support`` (n, d)), none in its ``excluded`` set, ordered least similar first and most similar last (nearest
    the query in the prompt, as OpenFlamingo's RICES); equal similarities go to the lower index. Raises
    ``ValueError`` when a query has fewer than k examples to choose from."""
    out = []
    for start in range(0, len(queries), 1024):  # (chunk, n) similarities at a time
        sims = queries[start:start + 1024].float() @ support.float().T
        for i, banned in enumerate(excluded[start:start + 1024]):
            sims[i, sorted(banned)] = float("-inf")
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        if order.shape[1] < k or not bool(sims.gather(1, order).isfinite().all()):
            raise ValueError(f"the support pool has fewer than {k} examples besides a query")
        out += [row[::-1] for row in order.tolist()]
    return out


# -------------------------------------------------------------------------------------------------- prompts
def prompt_text(task: str, tokenizer: Any, query: Item, examples: Sequence[Item]) -> str:
    """The text before the model's continuation: the examples solved in the model's training layout, one
    ``<image>`` each, then the query's ``<image>`` (with its question for VQA)."""
    if task == "vqa":
        return tokenizer.few_shot_question_text(query.question, [(e.question, e.text) for e in examples])
    return few_shot_prompt([e.text for e in examples], tokenizer.prompt)


def continuation_ids(tokenizer: Any, name: str) -> list[int]:
    """The tokens a class name adds after the query's ``<image>`` and the model's prompt: the caption tokens that
    training learns (:meth:`~vlm.data.gpt2_tokenizer.FlamingoTokenizer.encode_batch` without ``<|endofchunk|>``)."""
    prompt = tokenizer.prompt
    if not prompt:
        return tokenizer.encode(name)
    return tokenizer.encode(f"{prompt} {name}")[len(tokenizer.encode(prompt)):]


def prompt_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Each prompt as its ids (``bos`` included), as generation encodes it."""
    enc = tokenizer.encode_prompts(list(texts))
    return [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]


# ------------------------------------------------------------------------------------------- classification
@torch.no_grad()
def class_log_likelihoods(captioner: Any, images: Tensor, prefixes: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], rows_per_forward: int = 32) -> Tensor:
    """Each query's mean log-probability of each continuation's tokens (b, C): ``images`` (b, T, 3, H, W), query i's
    prompt ids ``prefixes[i]`` (``bos`` included), the class names' ``continuations``. One decoder pass scores
    ``rows_per_forward`` (query, class) rows, right-padded; with a closed vocabulary (``captioner.vocab_ids``) the
    softmax runs over it, as the training loss does, and a name outside it scores ``-inf``."""
    model, tok = captioner.model, captioner.tokenizer
    vocab = None if captioner.vocab_ids is None else torch.tensor(captioner.vocab_ids, device=images.device)
    pairs = [(i, c) for i in range(len(prefixes)) for c in range(len(continuations))]
    scores = torch.empty(len(prefixes), len(continuations))
    latents = model.encode_media(images)  # each query's images once, whatever the number of classes
    for start in range(0, len(pairs), rows_per_forward):
        chunk = pairs[start:start + rows_per_forward]
        rows = [list(prefixes[i]) + list(continuations[c]) for i, c in chunk]
        enc = tok.pad_batch(rows)
        hidden = model.hidden_from_latents(latents[[i for i, _ in chunk]], enc["input_ids"].to(images.device),
                                           enc["attention_mask"].to(images.device))  # fmt: skip
        for r, (i, c) in enumerate(chunk):
            target = torch.tensor(continuations[c], device=images.device)
            at = torch.arange(len(prefixes[i]) - 1, len(rows[r]) - 1, device=images.device)  # predicting the name
            if vocab is None:
                logp = F.log_softmax(model.unembed(hidden[r, at]).float(), -1).gather(1, target[:, None])
            else:
                index = torch.searchsorted(vocab, target).clamp(max=len(vocab) - 1)
                logp = F.log_softmax(model.unembed(hidden[r, at], vocab).float(), -1).gather(1, index[:, None])
                logp = logp.masked_fill((vocab[index] != target)[:, None], float("-inf"))
            scores[i, c] = logp.mean()
    return scores


# ---------------------------------------------------------------------------------------------------- harness
@dataclass
class FewShotEval:
    """One evaluation: a loaded Flamingo (:class:`~vlm.inference.CaptionPredictor`), the task, the queries, the
    support pool; :meth:`run` evaluates every (select, shots) and returns the results as a JSON-ready dict."""

    predictor: CaptionPredictor
    task: str
    queries: list[Item]
    support: list[Item]
    classes: list[str] = field(default_factory=list)
    seed: int = 0
    trials: int = 1
    warn: Callable[[str], None] = _say
    failed: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.excluded = exclusions(self.queries, self.support)
        self.tok = self.predictor.captioner.tokenizer
        self._pixels: dict[Path, Tensor] = {}
        self.query_embeddings = self.support_embeddings = None

    def check_images(self, progress: bool = False) -> None:
        """Decodes every query and support image once (cut to the model's size and kept); an unreadable one gets a
        warning and is left out (in ``failed``)."""
        paths, size = list(dict.fromkeys(i.path for i in self.queries + self.support)), self.predictor.image_size
        for path, image, reason in tqdm(model_inputs(paths, size), total=len(paths), desc="vlm eval: images",
                                        disable=not progress, file=sys.stderr):  # fmt: skip
            if reason is None:
                self._pixels[path] = image
            else:
                self.failed[str(path)] = reason
                self.warn(f"vlm eval: skipped {path}: {reason}")
        keep_q = [i for i, q in enumerate(self.queries) if q.path in self._pixels]
        keep_s = [j for j, s in enumerate(self.support) if s.path in self._pixels]
        renumber = {j: n for n, j in enumerate(keep_s)}
        self.excluded = [{renumber[j] for j in self.excluded[i] if j in renumber} for i in keep_q]
        self.queries, self.support = [self.queries[i] for i in keep_q], [self.support[j] for j in keep_s]
        if not self.queries:
            raise FewShotError("none of the query images could be read")

    def embed(self, clip_checkpoint: str, index: str | None = None) -> None:
        """The RICES embeddings of the queries and the support pool, with the CLIP ``clip_checkpoint``; support
        images that an index of that CLIP holds unchanged (same size and mtime) are taken from it."""
        clip = load_clip(clip_checkpoint)
        stored: dict[Path, Tensor] = {}
        if index is not None:
            found = load_index(index)
            if fingerprint(clip_checkpoint) != found.fingerprint:
                raise FewShotError(f"{index} was built with another CLIP ({found.checkpoint}) than --clip "
                                   f"{clip_checkpoint}: rebuild it with vlm index --rebuild, or leave --index out")
            for name, stat, row in zip(found.files, found.stats, found.embeddings):
                path = found.root / name
                try:
                    info = os.stat(path)
                except OSError:
                    continue
                if (info.st_size, info.st_mtime_ns) == stat:
                    stored[path.resolve()] = row
            if self.support and not any(s.path.resolve() in stored for s in self.support):
                raise FewShotError(f"{index} covers {found.root}, not the support images: build one over the "
                                   "support folder with vlm index")
        todo = list(dict.fromkeys(str(i.path.resolve()) for i in self.queries + self.support  # absolute: joined to /
                                  if i.path.resolve() not in stored))
        fresh: dict[str, Tensor] = {}

        def skip(name: str, reason: str) -> None:
            raise FewShotError(f"{name}: {reason}")

        for _, embedded in embed_files(clip, Path(os.sep), todo, skip, clip.batch_size):
            fresh.update(embedded)

        def vectors(items: list[Item]) -> Tensor:
            rows = [stored.get(i.path.resolve(), fresh.get(str(i.path.resolve()))) for i in items]
            return torch.stack(rows) if rows else torch.empty(0, 1)

        self.query_embeddings, self.support_embeddings = vectors(self.queries), vectors(self.support)

    def select(self, select: str, k: int, trial: int) -> list[list[int]]:
        """Each query's k examples (support indices, in prompt order) for a trial."""
        if k == 0:
            return [[] for _ in self.queries]
        if select == "rices":
            return rices_select(self.query_embeddings, self.support_embeddings, k, self.excluded)
        return random_select(len(self.support), k, self.excluded, self.seed, trial)

    def run(self, shots: Sequence[int], selects: Sequence[str], batch_size: int, progress: bool = False) -> list[dict]:
        """One result row per (select, shots): see docs/eval.md for the fields."""
        plans = {(s, k): [0] if k == 0 or s == "rices" else list(range(self.trials)) for s in selects for k in shots}
        bar = tqdm(total=len(self.queries) * sum(map(len, plans.values())), desc="vlm eval", unit="query",
                   disable=not progress, file=sys.stderr)  # fmt: skip
        rows, zero = [], None
        for (select, k), trials in plans.items():
            row: dict[str, Any] = {"select": select, "shots": k, "fits": True, "skipped": None, "note": None}
            try:
                chosen = [self.select(select, k, t) for t in trials]
            except ValueError as e:  # too small a pool
                rows.append({**row, "skipped": str(e)})
                bar.update(len(self.queries) * len(trials))
                continue
            texts = [[prompt_text(self.task, self.tok, q, [self.support[j] for j in ex])
                      for q, ex in zip(self.queries, c)] for c in chosen]  # fmt: skip
            longest = max(len(ids) for t in texts for ids in prompt_ids(self.tok, t))
            if self.task == "classify":
                longest += max(len(continuation_ids(self.tok, name)) for name in self.classes)
            context = self.predictor.model.context_length
            row.update(prompt_tokens=longest, context_length=context)
            if longest > context or (self.task != "classify" and longest >= context):
                rows.append({**row, "fits": False, "skipped": f"the prompt takes {longest} tokens, the decoder's "
                             f"context is {context}"})  # fmt: skip
                bar.update(len(self.queries) * len(trials))
                continue
            if k == 0 and zero is not None:  # no examples: every selection gives the same prompts
                runs = zero
                bar.update(len(self.queries))
            else:
                runs = [self._trial(t, c, p, batch_size, bar) for t, c, p in zip(trials, chosen, texts)]
                zero = runs if k == 0 else zero
            values = [r["metrics"][METRICS[self.task]] for r in runs]
            row.update(mean=float(np.mean(values)), std=float(np.std(values)), queries=len(self.queries), runs=runs)
            if k == 0:
                row["note"] = "no examples: nothing to draw, one run"
            elif select == "rices":
                row["note"] = f"rices is deterministic: one run stands for the {self.trials} trials"
            rows.append(row)
        bar.close()
        return rows

    def _trial(self, trial: int, chosen: list[list[int]], texts: list[str], batch_size: int, bar: Any) -> dict:
        predictions: list[dict[str, Any]] = []
        names = self.classes
        continuations = [continuation_ids(self.tok, n) for n in names] if self.task == "classify" else []
        for start in range(0, len(self.queries), batch_size):
            part = range(start, min(start + batch_size, len(self.queries)))
            images = torch.stack([self.predictor.preprocess([self._pixels[p] for p in
                                                             [self.support[j].path for j in chosen[i]] +
                                                             [self.queries[i].path]]) for i in part])  # fmt: skip
            if self.task == "vqa":
                shots = [[(self.support[j].question, self.support[j].text) for j in chosen[i]] for i in part]
                said = self.predictor.captioner.generate_answers(images, [self.queries[i].question for i in part],
                                                                 shots)  # fmt: skip
            elif self.task == "caption":
                said = self.predictor.captioner.generate_captions(images, [texts[i] for i in part])
            else:
                scores = class_log_likelihoods(self.predictor.captioner, images, prompt_ids(
                    self.tok, [texts[i] for i in part]), continuations, self.predictor.batch_size)
                said = [names[int(c)] for c in scores.argmax(1)]
            for i, text in zip(part, said):
                q = self.queries[i]
                record = {"query": i, "path": str(q.path), "prediction": text, "examples": chosen[i]}
                if self.task == "vqa":
                    record.update(question=q.question, score=vqa_score(text, q.references))
                elif self.task == "classify":
                    record.update(label=q.text, correct=text == q.text)
                predictions.append(record)
            bar.update(len(part))
        refs = [q.references for q in self.queries]
        said = [p["prediction"] for p in predictions]
        if self.task == "vqa":
            metrics = vqa_metrics(said, refs, [q.heldout for q in self.queries])
        elif self.task == "caption":
            metrics = caption_scores(said, refs)
        else:
            metrics = {"accuracy": sum(p["correct"] for p in predictions) / len(predictions)}
        return {"trial": trial, "metrics": metrics, "predictions": predictions}


def format_table(result: dict) -> str:
    """The results as a text table: one line per (select, shots), the headline metric's mean ± std over trials."""
    metric = result["metric"]
    lines = [f"{result['task']} on {result['data']}: {result['queries']} queries, {result['support_size']} support "
             f"examples, {metric} (mean ± std over trials)",
             f"{'select':<8}{'shots':>6}  {metric:<18}{'trials':>7}{'queries':>9}  note"]
    for row in result["results"]:
        if row["skipped"]:
            lines.append(f"{row['select']:<8}{row['shots']:>6}  {'-':<18}{'-':>7}{'-':>9}  {row['skipped']}")
            continue
        value = f"{row['mean']:.4f} ± {row['std']:.4f}"
        lines.append(f"{row['select']:<8}{row['shots']:>6}  {value:<18}{len(row['runs']):>7}{row['queries']:>9}  "
                     f"{row['note'] or ''}".rstrip())
    return "\n".join(lines)


__all__ = ["METRICS", "SELECTS", "TASKS", "FewShotError", "FewShotEval", "Item", "class_log_likelihoods",
           "class_names", "continuation_ids", "exclusions", "format_table", "prompt_ids", "prompt_text",
           "random_select", "read_items", "rices_select"]
