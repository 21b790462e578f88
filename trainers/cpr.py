"""CPR rows in the trainer: UniCorn's caption and judgement rows through the understanding loss,
reflection rows through image-conditioned generation, in the same Ray Train job as the image rows.

Where it fits: `pipelines.cpr` builds the rows from a round's pools; `trainers.train.train_adapter(
args, rows, out_dir, aux=cpr_rows)` checks and packs them here before any Ray call, and every worker's
micro-batch takes its slice of them (`aux_plan`) beside its generation rows: one backward pass carries
both losses, and every trainable weight is used on every rank (DDP needs that), because every
micro-batch still has generation rows.

Rows (every kind): kind, prompt_id, prompt, image_tokens: list[int] (T,)
    caption, judgement: question, target (the text the model must produce), system ("" = none)
    reflection: source_tokens (T,), the prompt's low-scored image; image_tokens is the high-scored one
Losses (each a mean token NLL; the micro-batch's aux loss is their row-weighted mean):
    understanding: target tokens given (image, question), the exact prompt `JanusUnified.answer` and
        `p_yes` build (`understanding_batch`); the image is the VQ decoding of image_tokens, what the
        judge saw.
    reflection: target image tokens given prompt + source image, conditional branch, laid out as
        [prompt ... <begin_of_image>] [source image] <end_of_image> <begin_of_image> [target image].
        Janus has no image-conditioned generation; this layout is ours (UniCorn's BAGEL has one).

Example:
    >>> rows = [{"kind": "caption", "prompt_id": "p", "prompt": "a red circle", "image_tokens": [1] * 4,
    ...          "question": "Which prompt was this image drawn from?", "target": " a red circle",
    ...          "system": "", "source_tokens": []}]
    >>> check_aux_rows(rows, num_image_tokens=4, codebook_size=8)
    >>> [len(c) for c in aux_plan(5, world=2, rank=0, seed=0, epoch=0, num_micro=2)]
    [2, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trainers.data import TrainDataError, token_row

KINDS = ("caption", "judgement", "reflection")
AUX_COLUMNS = ("kind", "prompt_id", "prompt", "image_tokens")
TEXT_COLUMNS = ("question", "target")


@dataclass
class PackedAux:
    """CPR rows, columnar (picklable, numpy and str only)."""

    kinds: list[str]
    prompts: list[str]
    questions: list[str]  # "" for reflection rows
    targets: list[str]  # "" for reflection rows
    systems: list[str]  # "" = no system prompt
    image_tokens: np.ndarray  # (M, T) int64
    source_tokens: np.ndarray  # (M, T) int64, zeros for caption / judgement rows

    def __len__(self) -> int:
        return len(self.kinds)


def check_aux_rows(rows: Sequence[dict], num_image_tokens: int, codebook_size: int) -> None:
    """Fail loudly on an unknown kind, missing columns, blank texts and bad token lists (row named)."""
    for i, row in enumerate(rows):
        missing = [c for c in AUX_COLUMNS if row.get(c) is None]
        if missing:
            raise TrainDataError(f"CPR row {i} is missing column(s) {', '.join(missing)}")
        if row["kind"] not in KINDS:
            raise TrainDataError(f"CPR row {i}: kind {row['kind']!r} is not one of {', '.join(KINDS)}")
        token_row(row["image_tokens"], f"CPR row {i}", "image_tokens", num_image_tokens, codebook_size)
        if row["kind"] == "reflection":
            token_row(row.get("source_tokens"), f"CPR row {i}", "source_tokens", num_image_tokens, codebook_size)
        elif not all(isinstance(row.get(c), str) and row[c].strip() for c in TEXT_COLUMNS):
            raise TrainDataError(f"CPR row {i} ({row['kind']}): question and target must be non-empty strings")


def pack_aux(rows: Sequence[dict], num_image_tokens: int) -> PackedAux:
    """Columnar copy of checked rows."""
    def toks(row: dict, column: str) -> np.ndarray:
        value = row.get(column)
        return np.asarray(value, np.int64) if value is not None and len(value) else np.zeros(num_image_tokens, np.int64)
    return PackedAux(kinds=[r["kind"] for r in rows], prompts=[r["prompt"] for r in rows],
                     questions=[r.get("question") or "" for r in rows], targets=[r.get("target") or "" for r in rows],
                     systems=[r.get("system") or "" for r in rows],
                     image_tokens=np.stack([toks(r, "image_tokens") for r in rows]),
                     source_tokens=np.stack([toks(r, "source_tokens") for r in rows]))


def aux_plan(n: int, world: int, rank: int, seed: int, epoch: int, num_micro: int) -> list[np.ndarray]:
    """This rank's CPR rows for each of its `num_micro` micro-batches of the epoch: a (seed, epoch)
    permutation dealt round-robin to ranks, then cut into near-equal chunks (a pure function)."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n)  # (n,) same on every rank
    return np.array_split(order[rank::world], num_micro)


def step_aux(aux: PackedAux | None, plan: list, step: int, world: int, rank: int, seed: int,
             epoch: int) -> list[np.ndarray] | None:
    """The CPR rows of each micro-batch of `plan[step]` (this rank's epoch plan), or None without any."""
    if aux is None:
        return None
    chunks = aux_plan(len(aux), world, rank, seed, epoch, sum(map(len, plan)))
    lo = sum(map(len, plan[:step]))
    return chunks[lo:lo + len(plan[step])]


def split(out) -> tuple:
    """(per-token log-probs, aux output or None) from the policy's forward."""
    return out if isinstance(out, tuple) else (out, None)


def with_aux(loss: torch.Tensor, stats: dict, aux_out, weight: float) -> tuple[torch.Tensor, dict]:
    """The generation loss plus weight x the CPR rows' loss; the metrics gain the CPR sums."""
    if aux_out is None:
        return loss, stats
    cpr_loss, cpr_stats = aux_out
    stats = {**stats, "gen_loss": loss.item(), **cpr_stats}
    return (loss if cpr_loss is None else loss + weight * cpr_loss), stats

def reflection_logprobs(unified, prompts: list[str], source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(target_t | prompt, source image, target_<t), conditional branch."""
    janus = unified.janus
    ids, mask = unified.encode_generation_prompts(prompts)  # (B, P), ends in <begin_of_image>
    B, P, T = ids.shape[0], ids.shape[1], target.shape[1]
    eoi = unified.tokenizer.convert_tokens_to_ids(unified.processor.image_end_token)
    sep = torch.tensor([eoi, unified.boi_id], device=ids.device).expand(B, 2)  # (B, 2)
    embed, image_embed = janus.get_input_embeddings(), janus.prepare_embeddings_for_image_generation
    emb = torch.cat([embed(ids), image_embed(source), embed(sep), image_embed(target[:, :-1])], 1)  # (B, P+2T+1, D)
    full_mask = torch.cat([mask, mask.new_ones(B, 2 * T + 1)], 1)
    pos = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
    h = janus.model.language_model(inputs_embeds=emb, attention_mask=full_mask, position_ids=pos).last_hidden_state
    logits = janus.model.generation_head(h[:, P + T + 1:])  # (B, T, V): <begin_of_image> predicts target_0
    return torch.log_softmax(logits.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def understanding_token_nll(unified, images: list, questions: list[str], targets: list[str],
                            system: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher-forced understanding pass: per-token NLL (b, L-1; 0 where unlabelled), the labels
    (b, L-1; -100 outside the targets) and the logits (b, L-1, V) that predict them."""
    batch = unified.understanding_batch(images, questions, targets, system=system or None)
    labels = batch.pop("labels")[:, 1:]  # (b, L-1): token t+1 is predicted at position t
    logits = unified.janus(**batch).logits[:, :-1].float()  # (b, L-1, V)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll, labels, logits


def understanding_nll(unified, images: list, questions: list[str], targets: list[str],
                      systems: list[str]) -> tuple[torch.Tensor, int]:
    """(summed NLL of the target tokens, their count), one forward per system prompt."""
    total, count = None, 0
    for system in dict.fromkeys(systems):
        rows = [i for i, s in enumerate(systems) if s == system]
        nll, labels, _ = understanding_token_nll(unified, [images[i] for i in rows], [questions[i] for i in rows],
                                                 [targets[i] for i in rows], system)
        total, count = nll.sum() if total is None else total + nll.sum(), count + int((labels != -100).sum())
    return total, count


def finish_metrics(metrics: dict) -> dict:
    """`und_loss` / `reflection_loss` (mean over the step's rows of that kind; NaN without any) from
    the summed `*_nll_rows` and `*_rows` metrics."""
    out = dict(metrics)
    for kind in ("und", "reflection"):
        if f"{kind}_rows" in out:
            rows, nll = out.pop(f"{kind}_rows"), out.pop(f"{kind}_nll_rows")
            out[f"{kind}_loss"], out[f"{kind}_rows"] = (nll / rows if rows else float("nan")), rows
    return out


def aux_loss(unified, data: PackedAux, idx: np.ndarray, images: dict) -> tuple[torch.Tensor | None, dict]:
    """Row-weighted mean of the understanding and reflection losses of rows `idx` (None without rows),
    and per kind the loss times rows and the rows (the same keys on every rank, so ranks can be summed).
    `images` caches each row's decoded image (the VQ decoder is frozen: decode once per worker)."""
    dev = unified.device
    und = [int(i) for i in idx if data.kinds[i] != "reflection"]
    refl = [int(i) for i in idx if data.kinds[i] == "reflection"]
    terms, stats = [], {"und_nll_rows": 0.0, "und_rows": len(und), "reflection_nll_rows": 0.0,
                        "reflection_rows": len(refl)}
    if und:
        todo = [i for i in und if i not in images]
        if todo:
            with torch.no_grad():
                decoded = unified.decode_tokens(torch.from_numpy(data.image_tokens[todo]).to(dev))
            images.update(zip(todo, decoded))
        nll, count = understanding_nll(unified, [images[i] for i in und], [data.questions[i] for i in und],
                                       [data.targets[i] for i in und], [data.systems[i] for i in und])
        terms.append((nll / max(count, 1), len(und)))
        stats["und_nll_rows"] = terms[-1][0].item() * len(und)
    if refl:
        src, tgt = (torch.from_numpy(a[refl]).to(dev) for a in (data.source_tokens, data.image_tokens))
        terms.append((-reflection_logprobs(unified, [data.prompts[i] for i in refl], src, tgt).mean(), len(refl)))
        stats["reflection_nll_rows"] = terms[-1][0].item() * len(refl)
    if not terms:
        return None, stats
    return sum(loss * n for loss, n in terms) / sum(n for _, n in terms), stats
