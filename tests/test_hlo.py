"""Reading collectives out of HLO text: counts and the pairs that may run at once."""

from jaxscale.hlo import collective_stats, replica_groups, unordered_collectives

# A loop holding an all-gather, and an all-gather outside it: unordered in `main`, ordered in
# `ordered`; the same pair on another group or channel; two plain collectives (which XLA:CPU
# runs in program order) with no path between them.
PROGRAM = """HloModule m, is_scheduled=true

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %x = f32[4] get-tuple-element(%p), index=1
  %g = f32[8] all-gather(%x), channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={0}
  %s = f32[4] slice(%g), slice={[0:4]}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4]) tuple(%i, %s)
}

%cond (c: (s32[], f32[4])) -> pred[] {
  %c = (s32[], f32[4]) parameter(0)
  ROOT %k = pred[] constant(false)
}

ENTRY %main (a: f32[4], b: f32[4]) -> f32[8] {
  %a = f32[4] parameter(0)
  %b = f32[4] parameter(1)
  %z = s32[] constant(0)
  %in = (s32[], f32[4]) tuple(%z, %a)
  %loop = (s32[], f32[4]) while(%in), condition=%cond, body=%body
  %alone = f32[8] all-gather(%b), channel_id=1, replica_groups=[2,2]<=[4], dimensions={0}
  %other_group = f32[8] all-gather(%b), channel_id=1, replica_groups={{0,2},{1,3}}, dimensions={0}
  %other_channel = f32[8] all-gather(%b), channel_id=7, replica_groups={{0,1},{2,3}}, dimensions={0}
  %sum = f32[4] all-reduce(%b), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%cond
  %out = f32[4] get-tuple-element(%loop), index=1
  %after = f32[8] all-gather(%out), channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={0}
  ROOT %r = f32[8] add(%after, %alone)
}
"""


def test_a_loop_and_a_collective_of_its_kind_group_and_channel_with_no_path_between_them():
    assert unordered_collectives(PROGRAM) == [("main", "loop", "alone")]
    ordered = PROGRAM.replace("all-gather(%b), channel_id=1, replica_groups=[2,2]",
                              "all-gather(%out), channel_id=1, replica_groups=[2,2]")
    assert unordered_collectives(ordered) == []


def test_replica_groups_in_each_notation():
    pairs = frozenset({frozenset({0, 4}), frozenset({1, 5}), frozenset({2, 6}), frozenset({3, 7})})
    assert replica_groups("replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}") == pairs
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}") == pairs
    assert replica_groups("replica_groups=mesh['data'=2,'fsdp'=4] {'data'}, dimensions={0}") == pairs
    quads = frozenset({frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7})})
    assert replica_groups("replica_groups=mesh['a'=1,'b'=4,'c'=2], device_ids=([2,4]T(1,0)) {'b'}, "
                   "dimensions={0}") == quads
    assert replica_groups("replica_groups={}, dimensions={0}") is None  # every device: unknown count


def test_collective_stats_count_ops_and_result_bytes():
    stats = collective_stats(PROGRAM)
    assert stats["all-gather"] == (5, 5 * 8 * 4) and stats["all-reduce"] == (1, 16)
