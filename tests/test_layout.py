from lnconvert.layout import Layout, describe


def test_block_layout_puts_twins_after_primaries():
    lay = Layout.linked(3, 1, 1, "a")
    assert lay.primary == (0, 1, 2) and lay.twin == (3, 4, 5) and lay.width == 6
    assert describe(lay) == "block 3->6"


def test_grouped_layout_keeps_each_pair_inside_its_group():
    lay = Layout.linked(4, 2, 1, "a")
    assert lay.primary == (0, 1, 4, 5) and lay.twin == (2, 3, 6, 7)
    assert lay.fits_groups(2) and lay.fits_groups(1) and not lay.fits_groups(4)
    assert Layout.linked(4, 4, 1, "a").fits_groups(4)
    assert not Layout.linked(4, 1, 1, "a").fits_groups(4)  # depthwise needs grouped(C)


def test_concat_offsets_and_mixed_inputs():
    lay = Layout.concat([Layout.plain(2, 1), Layout.linked(2, 1, 1, "a")], 1)
    assert lay.primary == (0, 1, 2, 3) and lay.twin == (-1, -1, 4, 5)
    assert lay.width == 6 and not lay.has_all_twins and lay.sources == {"a"}
    assert lay.logical_of_physical() == [0, 1, 2, 3, 2, 3]


def test_flatten_expands_each_channel_into_its_trailing_elements():
    lay = Layout.linked(2, 1, 1, "a").expand_trailing(3)
    assert lay.primary == (0, 1, 2, 3, 4, 5) and lay.twin == (6, 7, 8, 9, 10, 11)


def test_origins_name_each_twins_activation_and_channel():
    full, part = Layout.linked(3, 1, 1, "a"), Layout.linked(3, 1, 1, "b", [2, 0])
    assert [full.origin(c) for c in range(3)] == [(("a", 0),), (("a", 1),), (("a", 2),)]
    assert [part.origin(c) for c in range(3)] == [(("b", 0),), (), (("b", 2),)] and part.sources == {"b"}
    assert Layout.linked(3, 1, 1, "c", []).sources == frozenset()
    assert part.permuted([2, 1, 0]).origin(0) == (("b", 2),)
    assert full.merged(part).origin(0) == (("a", 0), ("b", 0)) and full.merged(part).sources == {"a", "b"}
