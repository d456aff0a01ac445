"""Whole-model parity for task models whose outputs are not plain tensors: detections.

A detector's output after non-maximum suppression (NMS) is a set, not a tensor: two
near-equal scores may come out in either order, and a near-tie at a decision (which of two
overlapping boxes NMS keeps, which detection is the last one under the per-image cap) may
keep a different member. Comparing such outputs position by position fails on a conversion
that changed nothing beyond rounding. Detections are therefore compared

1. **before NMS, exactly**: the outputs of the heads that feed anchor decoding and NMS
   (``head`` of RetinaNet / FCOS / SSD, ``rpn.head`` of the R-CNNs) as tensors, within the
   tolerance;
2. **after NMS, as sets**: per image, each detection of the original is matched to one of
   the converted model's with the same label, box coordinates within ``tolerance x max(1,
   max |coordinate|)`` and score within ``tolerance``; matched pairs also compare their masks,
   keypoints and keypoint scores. A detection left without a partner passes only as a
   near-tie that NMS or the per-image cap decided (:func:`near_ties`); anything else fails.

A comparison of zero detections proves nothing about the detection outputs; it is reported
as such (``TaskComparison.detections == 0``), never as a pass of them.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torchvision.ops import box_iou

from .report import OutputParity
from .verify import PRECISIONS, compare, eval_mode, flat_outputs, parity

DETECTION_KEYS = ("boxes", "scores", "labels")
# torchvision's detection heads: their outputs feed anchor decoding and NMS, and nothing in
# front of them selects by value, so they compare exactly
PRE_NMS_STAGES = ("head", "rpn.head")
_EXTRAS = ("masks", "keypoints", "keypoints_scores")  # per-detection tensors compared on matched pairs


@dataclass(frozen=True)
class DecisionLimits:
    """The decisions a detector takes on scores and overlaps: the per-image cap on detections
    and the NMS IoU threshold (None where the model has none or they are unknown)."""

    max_detections: int | None = None
    nms_iou: float | None = None


@dataclass
class ImageMatch:
    """One image's detections compared as sets."""

    matched: int
    unmatched_expected: list[int]  # indices into the original's detections, not excused
    unmatched_got: list[int]
    near_ties: int  # detections without a partner, excused as near-ties
    max_abs: float
    max_rel: float

    @property
    def ok(self) -> bool:
        return not self.unmatched_expected and not self.unmatched_got


@dataclass
class TaskComparison:
    """Rows as :func:`lnconvert.verify.compare` gives them, plus what was compared: the number
    of matched detections (None: the outputs are no detections) and notes for the report."""

    rows: list[OutputParity]
    detections: int | None = None
    notes: list[str] = field(default_factory=list)


def is_detection_output(output: Any) -> bool:
    """torchvision's detection output: a list of dicts holding boxes, scores and labels."""
    return isinstance(output, (list, tuple)) and bool(output) and all(
        isinstance(d, dict) and all(k in d for k in DETECTION_KEYS) for d in output)


def decision_limits(model: nn.Module) -> DecisionLimits:
    """The cap and NMS threshold of torchvision's detectors (RetinaNet, FCOS, SSD keep them on
    the model, the R-CNNs on ``roi_heads``)."""
    holder = getattr(model, "roi_heads", model)
    cap, iou = getattr(holder, "detections_per_img", None), getattr(holder, "nms_thresh", None)
    return DecisionLimits(int(cap) if isinstance(cap, int) else None, float(iou) if isinstance(iou, float) else None)


def _relative(delta: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    max_abs = float(delta.max()) if delta.numel() else 0.0
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    return max_abs, max_abs / scale


def _pairs(expected: dict, got: dict, box_tol: float, score_tol: float) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, closest pairs first, among pairs with the same label, every
    box coordinate within ``box_tol`` and the score within ``score_tol``."""
    boxes = (expected["boxes"][:, None, :] - got["boxes"][None, :, :]).abs().amax(-1)
    scores = (expected["scores"][:, None] - got["scores"][None, :]).abs()
    allowed = (boxes <= box_tol) & (scores <= score_tol) & (expected["labels"][:, None] == got["labels"][None, :])
    candidates = allowed.nonzero()
    cost = boxes[allowed] / box_tol + scores[allowed] / score_tol
    used_e, used_g, pairs = set(), set(), []
    for i, j in candidates[cost.argsort(stable=True)].tolist():
        if i not in used_e and j not in used_g:
            used_e.add(i)
            used_g.add(j)
            pairs.append((i, j))
    return pairs


def near_ties(expected: dict, got: dict, lost: list[int], extra: list[int], limits: DecisionLimits,
              score_tol: float, box_tol: float) -> tuple[list[int], list[int]]:
    """The unmatched detections (``lost``: of ``expected``; ``extra``: of ``got``) that a
    near-tie explains, as (excused lost, excused extra). A near-tie is a decision that a
    change of one score or box within the tolerance could flip:

    - **swap**: NMS kept A in one model and an overlapping B (same label, IoU above the NMS
      threshold) in the other, their scores within twice the tolerance;
    - **overlap at the threshold**: a detection that the other model suppressed with a
      detection of the same label whose IoU with it is within the boxes' tolerance of the
      NMS threshold, its score not below this one's by more than twice the tolerance;
    - **cut-off**: the other model's list is full (the per-image cap) and this score is
      within twice the tolerance of its lowest score;
    - **cascade**: a detection that an excused one (present in the other model only) would
      suppress: same label, IoU above the threshold, not a lower score.

    A box that moved beyond the tolerance to where it overlaps nothing of its own is never
    excused; one that moved yet still overlaps its old place above the NMS threshold with the
    same score looks like a swap here, and the pre-NMS comparison catches it.
    """
    tie = 2 * score_tol
    sides = {"lost": (expected, got, set(lost)), "extra": (got, expected, set(extra))}
    excused: dict[str, set[int]] = {"lost": set(), "extra": set()}
    if not lost and not extra:
        return [], []
    iou = limits.nms_iou
    cross = box_iou(expected["boxes"], got["boxes"]) if len(expected["boxes"]) and len(got["boxes"]) else None

    def overlap(side: str, i: int, j: int) -> float:  # IoU of detection i of side with j of the other
        return float(cross[i, j] if side == "lost" else cross[j, i])

    def slack(side: str, i: int) -> float:  # how far the IoU may move with the boxes' tolerance
        x1, y1, x2, y2 = sides[side][0]["boxes"][i].tolist()
        return min(0.05, 8 * box_tol / max(1e-6, min(x2 - x1, y2 - y1)))

    if iou is not None and cross is not None:
        for i in sorted(lost):  # swaps: one partner each
            for j in sorted(set(extra) - excused["extra"]):
                if expected["labels"][i] == got["labels"][j] and abs(float(expected["scores"][i] - got["scores"][j])) \
                        <= tie and overlap("lost", i, j) > iou - slack("lost", i):
                    excused["lost"].add(i)
                    excused["extra"].add(j)
                    break
        for side, (mine, other, unmatched) in sides.items():  # overlaps at the threshold
            for i in unmatched - excused[side]:
                for j in range(len(other["boxes"])):
                    if mine["labels"][i] == other["labels"][j] and float(other["scores"][j]) >= \
                            float(mine["scores"][i]) - tie and abs(overlap(side, i, j) - iou) <= slack(side, i):
                        excused[side].add(i)
                        break
    cap = limits.max_detections
    for side, (mine, other, unmatched) in sides.items():  # the per-image cap
        if cap is not None and len(other["scores"]) >= cap:
            floor = float(other["scores"].min())
            excused[side] |= {i for i in unmatched if float(mine["scores"][i]) <= floor + tie}
    if iou is not None and cross is not None:
        grew = True
        while grew:  # cascades: suppressed in the other model by a detection only it has
            grew = False
            for side, (mine, other, unmatched) in sides.items():
                suppressors = excused["extra" if side == "lost" else "lost"]
                for i in unmatched - excused[side]:
                    if any(mine["labels"][i] == other["labels"][j] and overlap(side, i, j) > iou - slack(side, i)
                           and float(other["scores"][j]) >= float(mine["scores"][i]) - tie for j in suppressors):
                        excused[side].add(i)
                        grew = True
    return sorted(excused["lost"]), sorted(excused["extra"])


def match_detections(expected: dict, got: dict, tolerance: float, limits: DecisionLimits = DecisionLimits()
                     ) -> ImageMatch:
    """One image's detections compared as sets (see the module docstring)."""
    scale = max(1.0, float(expected["boxes"].abs().max())) if expected["boxes"].numel() else 1.0
    box_tol, score_tol = tolerance * scale, tolerance
    pairs = _pairs(expected, got, box_tol, score_tol)
    lost = sorted(set(range(len(expected["boxes"]))) - {i for i, _ in pairs})
    extra = sorted(set(range(len(got["boxes"]))) - {j for _, j in pairs})
    excused_lost, excused_extra = near_ties(expected, got, lost, extra, limits, score_tol, box_tol)
    worst_abs, worst_rel = 0.0, 0.0
    if pairs:
        e, g = (torch.tensor(side) for side in zip(*pairs))
        # coordinates (boxes; keypoints' x, y, visibility 0/1) relative to the boxes' scale,
        # scores absolutely, masks and keypoint scores as any output: max(1, max |reference|)
        scales = {"boxes": scale, "keypoints": scale, "scores": 1.0}
        for key in ("boxes", "scores") + tuple(k for k in _EXTRAS if k in expected and k in got):
            ref = expected[key][e].double()
            delta = (ref - got[key][g].double()).abs()
            max_abs = float(delta.max()) if delta.numel() else 0.0
            max_rel = max_abs / scales[key] if key in scales else _relative(delta, ref)[1]
            worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
    return ImageMatch(len(pairs), [i for i in lost if i not in excused_lost],
                      [j for j in extra if j not in excused_extra], len(excused_lost) + len(excused_extra),
                      worst_abs, worst_rel)


@contextlib.contextmanager
def _recording(model: nn.Module, stages: Sequence[str]) -> Iterator[dict[str, list[tuple[str, torch.Tensor]]]]:
    """Each stage module's output of its first call while the block runs."""
    seen: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen.setdefault(name, flat_outputs(output))
        return hook

    handles = [model.get_submodule(s).register_forward_hook(recorder(s)) for s in stages]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _cast(args: tuple, dtype: torch.dtype) -> tuple:
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, args)


def _present(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def compare_detections(reference: nn.Module, candidate: nn.Module,
                       inputs: Sequence[tuple[str, tuple[Any, ...]]], tolerance: float,
                       precision: str = "float64") -> TaskComparison:
    """A detector's outputs compared before NMS (head outputs, as tensors) and after it (as
    sets, near-ties excused), on each named input tuple, both models in eval mode in
    ``precision`` (copies; neither model is modified)."""
    dtype = PRECISIONS[precision]
    native = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
    stages = [s for s in PRE_NMS_STAGES if _present(reference, s) and _present(candidate, s)]
    limits = decision_limits(reference)
    result = TaskComparison([], detections=0)
    with torch.no_grad(), eval_mode(reference), eval_mode(candidate):
        ref_model, cand_model = (copy.deepcopy(m).to(dtype) for m in (reference, candidate))
        for label, args in inputs:
            args = _cast(args, dtype)
            with _recording(ref_model, stages) as ref_stages:
                expected = ref_model(*args)
            with _recording(cand_model, stages) as cand_stages:
                got = cand_model(*args)
            for stage in stages:
                ref_out, cand_out = ref_stages.get(stage, []), cand_stages.get(stage, [])
                if len(ref_out) != len(cand_out):
                    result.rows.append(OutputParity(f"{stage} (before NMS)", label, float("inf"), float("inf"),
                                                    False, precision))
                for (name, ref), (_, cand) in zip(ref_out, cand_out):
                    max_abs, max_rel = parity(ref, cand)
                    result.rows.append(OutputParity(f"{stage} {name} (before NMS)", label, max_abs, max_rel,
                                                    max_rel <= tolerance, precision))
            if len(expected) != len(got):
                result.rows.append(OutputParity("detections", label, float("inf"), float("inf"), False, precision))
                continue
            # the original's own rounding floor: its detections in its own dtype against ``precision``
            own = reference(*_cast(args, native)) if native != dtype else None
            for image, (e, g) in enumerate(zip(expected, got)):
                match = match_detections(e, g, tolerance, limits)
                result.detections += match.matched
                lost, extra = len(match.unmatched_expected), len(match.unmatched_got)
                unmatched = float("inf") if lost or extra else 0.0
                row = OutputParity(f"detections[{image}]", label, max(match.max_abs, unmatched),
                                   max(match.max_rel, unmatched), match.ok and match.max_rel <= tolerance, precision)
                if own is not None:  # pairs found with a looser tolerance: float32 moves boxes more than 1e-5
                    row.native_noise = match_detections(e, own[image], max(tolerance, 1e-3), limits).max_rel
                result.rows.append(row)
                if lost or extra:
                    result.notes.append(f"{label} input, image {image}: {lost} detection(s) of the original and "
                                        f"{extra} of the converted model without a partner (no near-tie explains "
                                        f"them)")
                if match.near_ties:
                    result.notes.append(f"{label} input, image {image}: {match.near_ties} detection(s) without a "
                                        f"partner excused as near-ties of NMS or the per-image cap")
    return result


def compare_task(reference: nn.Module, candidate: nn.Module, inputs: Sequence[tuple[str, tuple[Any, ...]]],
                 tolerance: float, precision: str = "float64", *, detections: bool | None = None) -> TaskComparison:
    """:func:`compare_detections` when the reference's output is torchvision-style detections
    (``detections``; None: run the reference on the first input to find out), else every
    output tensor position by position (:func:`lnconvert.verify.compare`)."""
    if detections is None:
        with torch.no_grad(), eval_mode(reference):
            detections = is_detection_output(reference(*inputs[0][1]))
    if detections:
        return compare_detections(reference, candidate, inputs, tolerance, precision)
    return TaskComparison(compare(reference, candidate, inputs, tolerance, precision))


__all__ = ["DecisionLimits", "ImageMatch", "PRE_NMS_STAGES", "TaskComparison", "compare_detections", "compare_task",
           "decision_limits", "is_detection_output", "match_detections", "near_ties"]
