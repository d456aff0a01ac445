"""Detections compared as sets (lnconvert.compare_tasks): reordered near-ties and decisions that
a tolerance-sized change flips pass; moved, missing, relabelled or rescored detections fail; the
heads before NMS compare exactly; zero detections are never a pass."""
import copy

import pytest
import torch
from torch import nn

from lnconvert.compare_tasks import DecisionLimits, compare_detections, match_detections

TOL = 1e-5
LIMITS = DecisionLimits(max_detections=4, nms_iou=0.5)


def detections(rows: list[tuple[float, float, float, float, float, int]]) -> dict[str, torch.Tensor]:
    """(x1, y1, x2, y2, score, label) rows -> torchvision's detection dict, sorted by score as NMS leaves it."""
    rows = sorted(rows, key=lambda r: -r[4])
    t = torch.tensor([r[:5] for r in rows], dtype=torch.float64).reshape(-1, 5)
    return {"boxes": t[:, :4], "scores": t[:, 4], "labels": torch.tensor([r[5] for r in rows], dtype=torch.int64)}


BASE = [(10, 10, 50, 50, 0.9, 1), (60, 60, 100, 90, 0.7, 2), (0, 70, 30, 120, 0.4, 1)]


def test_identical_sets_in_another_order_with_near_tied_scores_match():
    expected = detections(BASE + [(70, 0, 110, 40, 0.4 + 1e-9, 3)])  # two scores 1e-9 apart
    got = {k: v.flip(0) for k, v in detections([(x1 + 1e-7, y1, x2, y2, s, c) for x1, y1, x2, y2, s, c in BASE]
                                               + [(70, 0, 110, 40, 0.4 - 1e-9, 3)]).items()}
    match = match_detections(expected, got, TOL, LIMITS)
    assert match.ok and match.matched == 4 and match.near_ties == 0
    assert 1e-12 < match.max_rel < TOL


def test_a_moved_box_fails():
    moved = [BASE[0], (60 + 30, 60, 100 + 30, 90, 0.7, 2), BASE[2]]  # shifted by most of its width: IoU < 0.5
    match = match_detections(detections(BASE), detections(moved), TOL, LIMITS)
    assert not match.ok and match.matched == 2
    assert match.unmatched_expected == [1] and match.unmatched_got == [1]


@pytest.mark.parametrize("change", ["label", "score", "missing"])
def test_relabelled_rescored_or_missing_detections_fail(change):
    x1, y1, x2, y2, s, c = BASE[1]
    other = {"label": [(x1, y1, x2, y2, s, 3)], "score": [(x1, y1, x2, y2, s + 1e-3, c)], "missing": []}[change]
    match = match_detections(detections(BASE), detections([BASE[0], BASE[2]] + other), TOL, LIMITS)
    assert not match.ok


def test_a_slightly_moved_box_fails_unless_nms_could_have_swapped_it():
    """Moved by 1e-2 (over the 1e-3 box tolerance) with its score unchanged, it overlaps its old
    place above the NMS threshold: after NMS that is indistinguishable from a swap of two near-tied
    boxes, so only the comparison before NMS (the heads) can catch it."""
    x1, y1, x2, y2, s, c = BASE[1]
    moved = detections([BASE[0], BASE[2], (x1 + 1e-2, y1, x2, y2, s, c)])
    assert not match_detections(detections(BASE), moved, TOL, DecisionLimits()).ok
    assert match_detections(detections(BASE), moved, TOL, LIMITS).near_ties == 2


def test_nms_swap_of_two_overlapping_near_tied_boxes_is_excused():
    """The original kept A and suppressed B; the converted model, B's score now 1e-7 higher, the reverse."""
    a, b = (10, 10, 50, 50, 0.8, 1), (12, 11, 51, 52, 0.8 + 1e-7, 1)  # IoU about 0.85
    match = match_detections(detections([a] + BASE[1:]), detections([b] + BASE[1:]), TOL, LIMITS)
    assert match.ok and match.matched == 2 and match.near_ties == 2


def test_a_swap_of_boxes_with_different_scores_is_not_a_tie():
    a, b = (10, 10, 50, 50, 0.8, 1), (12, 11, 51, 52, 0.6, 1)
    match = match_detections(detections([a] + BASE[1:]), detections([b] + BASE[1:]), TOL, LIMITS)
    assert not match.ok


def test_cut_off_swap_at_the_per_image_cap_is_excused_only_when_the_list_is_full():
    full = BASE + [(70, 0, 110, 40, 0.3, 3)]  # 4 = the cap
    swapped = BASE + [(0, 0, 5, 5, 0.3 + 1e-7, 4)]  # another detection took the last place
    assert match_detections(detections(full), detections(swapped), TOL, LIMITS).ok
    assert not match_detections(detections(full), detections(swapped), TOL, DecisionLimits(max_detections=10)).ok
    assert not match_detections(detections(full), detections(swapped), TOL, DecisionLimits()).ok


def test_overlap_at_the_nms_threshold_is_excused():
    """IoU of a and b is 0.5 +- 1e-9: the original suppressed b, the converted model kept it."""
    a = (0, 0, 30, 10, 0.9, 1)
    b = (10, 0, 40, 10, 0.5, 1)  # IoU = 20 / 40 = 0.5 exactly
    match = match_detections(detections([a]), detections([a, b]), TOL, LIMITS)
    assert match.ok and match.near_ties == 1
    far = (20, 0, 50, 10, 0.5, 1)  # IoU 1/5: nothing would have suppressed it
    assert not match_detections(detections([a]), detections([a, far]), TOL, LIMITS).ok


def test_masks_and_keypoints_of_matched_pairs_are_compared():
    expected, got = detections(BASE), detections(BASE)
    expected["masks"] = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got["masks"] = expected["masks"].clone()
    assert match_detections(expected, got, TOL, LIMITS).max_rel < 1e-12
    got["masks"][1, 0, 3, 3] += 1e-3
    match = match_detections(expected, got, TOL, LIMITS)
    assert match.ok and match.max_rel == pytest.approx(1e-3, rel=1e-6)  # the set matched; the masks did not


class TinyDetector(nn.Module):
    """A head, then a value-dependent selection (top 3 scores), then torchvision-style dicts."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 5)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            raw = self.head(image)
            scores, keep = raw[:, 4].sigmoid().topk(3)
            boxes = raw[keep, :4].abs().cumsum(-1) * 10
            out.append({"boxes": boxes, "scores": scores, "labels": torch.ones(3, dtype=torch.int64)})
        return out


def test_heads_are_compared_before_nms_and_zero_detections_are_counted():
    torch.manual_seed(0)
    model = TinyDetector().eval()
    images = ([torch.randn(6, 4), torch.randn(6, 4)],)
    same = compare_detections(model, copy.deepcopy(model), [("random", images)], TOL)
    assert same.detections == 6 and all(r.ok for r in same.rows)
    assert [r.output for r in same.rows] == ["head output (before NMS)", "detections[0]", "detections[1]"]
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.head.weight[0, 0] += 1e-3
    rows = {r.output: r for r in compare_detections(model, nudged, [("random", images)], TOL).rows}
    assert not rows["head output (before NMS)"].ok

    class Nothing(TinyDetector):  # e.g. every score under the threshold
        def forward(self, images):
            return [{k: v[:0] for k, v in d.items()} for d in super().forward(images)]

    empty = Nothing()
    nothing = compare_detections(empty, copy.deepcopy(empty), [("random", images)], TOL)
    assert nothing.detections == 0 and all(r.ok for r in nothing.rows)
