"""Meshes from axis sizes and logical-axis rules: fills, errors, specs, ZeRO sharding, DCN."""

import pytest
from conftest import devices_or_skip
from jax.sharding import PartitionSpec as P

from jaxscale.config import base_config
from jaxscale.errors import UserError
from jaxscale.mesh import hybrid_devices, make_mesh, resolve_axis_sizes
from jaxscale.parallel import DEFAULT_RULES, make_layout
from jaxscale.parallel.vocab_parallel import vocab_split
from jaxscale.parallel.zero import zero_spec
from jaxscale.sharding import Layout, merge_rules


def test_minus_one_fills_the_remaining_devices():
    sizes = resolve_axis_sizes({"data": 2, "fsdp": -1, "tensor": 2}, 16)
    assert (sizes["data"], sizes["fsdp"], sizes["tensor"], sizes["pipeline"]) == (2, 4, 2, 1)


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3}, "needs 3 devices but 8 are present"),
    ({"data": -1, "tensor": 3}, "does not divide 8"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": 0}, "data=0 is invalid"),
    ({"model": 8}, "unknown mesh axis 'model'"),
])
def test_bad_mesh_sizes_say_what_is_wrong(sizes, message):
    with pytest.raises(UserError, match=message):
        resolve_axis_sizes(sizes, 8)


def test_mesh_shape_and_axis_order():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices_or_skip(8))
    assert mesh.axis_names == ("pipeline", "data", "fsdp", "expert", "context", "tensor")
    assert dict(mesh.shape) == {"pipeline": 1, "data": 2, "fsdp": 2, "expert": 1, "context": 1,
                                "tensor": 2}


@pytest.fixture(scope="module")
def layout():
    return Layout(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices_or_skip(8)), DEFAULT_RULES)


def test_specs_follow_rules_and_use_each_mesh_axis_once(layout):
    assert layout.spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert layout.spec(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)
    assert layout.spec(("vocab", "embed")) == P("tensor", "fsdp")


def test_size_one_axes_are_dropped():
    lay = Layout(make_mesh({"data": 1, "fsdp": 8}, devices_or_skip(8)), DEFAULT_RULES)
    assert lay.spec(("batch", "mlp")) == P("fsdp", None)


def test_indivisible_dimension_is_reported_before_compiling(layout):
    with pytest.raises(UserError, match=r"dimension 1 \(mlp=5\) is not divisible by mesh axes tensor=2"):
        layout.spec(("embed", "mlp"), (8, 5), "parameter w")


def test_unknown_logical_axis_and_unknown_mesh_axis(layout):
    with pytest.raises(UserError, match="logical axis 'image_patches' has no rule"):
        layout.spec(("image_patches",))
    with pytest.raises(UserError, match="names mesh axis 'model'"):
        Layout(layout.mesh, merge_rules(DEFAULT_RULES, [("mlp", "model")]))


def test_a_config_rule_for_a_logical_axis_no_model_names_is_refused(layout):
    config = base_config()
    config.parallel.rules = (("embd", "fsdp"),)  # a typo would otherwise leave `embed` unsharded
    with pytest.raises(UserError, match="parallel.rules names logical axis 'embd', which no model"):
        make_layout(config, layout.mesh)
    config.parallel.rules = (("embed", ("fsdp", "data")),)
    assert make_layout(config, layout.mesh).spec(("embed",)) == P(("fsdp", "data"))


def test_user_rules_override_defaults(layout):
    rules = merge_rules(DEFAULT_RULES, [("mlp", None), ("embed", ["fsdp", "data"])])
    lay = Layout(layout.mesh, rules)
    assert lay.spec(("embed", "mlp")) == P(("fsdp", "data"), None)


def test_zero_adds_data_to_a_data_parallel_dimension_only():
    mesh = make_mesh({"data": 4, "tensor": 2}, devices_or_skip(8))
    lay = Layout(mesh, DEFAULT_RULES)
    assert zero_spec(lay, P(None, "tensor"), (16, 8)) == P("data", "tensor")
    assert zero_spec(lay, P("tensor", None), (16, 8)) == P("tensor", "data")
    assert zero_spec(lay, P("tensor"), (16,)) == P("tensor")  # no candidate: stays as it was
    assert zero_spec(lay, P(None), (6,)) == P(None)  # 4 does not divide 6


def test_vocabulary_tables_are_split_by_vocabulary_where_the_rules_allow():
    fsdp = Layout(make_mesh({"fsdp": 4, "tensor": 2}, devices_or_skip(8)), DEFAULT_RULES)
    assert vocab_split(fsdp, P("fsdp", None), (8, 32), ("embed", "vocab")) == P(None, "fsdp")
    assert vocab_split(fsdp, P("fsdp", "tensor"), (8, 32), ("embed", "vocab")) == P("fsdp", "tensor")
    assert vocab_split(fsdp, P(None, "fsdp"), (30, 8), ("vocab", "embed")) == P(None, "fsdp")  # 4∤30
    assert vocab_split(fsdp, P("fsdp", None), (8, 32), ("embed", "mlp")) == P("fsdp", None)
    zero = Layout(make_mesh({"data": 8}, devices_or_skip(8)), DEFAULT_RULES)
    assert zero_spec(zero, P(), (16, 32), ("embed", "vocab")) == P(None, "data")
    assert zero_spec(zero, P(), (16, 32), ("embed", "mlp")) == P("data", None)


class FakeDevice:
    """Enough of a device for `hybrid_devices`: an id, a process and optionally a slice."""

    def __init__(self, id, process_index, slice_index=None):
        self.id, self.process_index, self.platform, self.device_kind = id, process_index, "cpu", "cpu"
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"{self.id}"


def device_grid(sizes, dcn, devices):
    grid = hybrid_devices(resolve_axis_sizes(sizes, len(devices)), dcn, devices)
    return [[d.id for d in row] for row in grid.reshape(sizes["data"], sizes["fsdp"])]


def test_dcn_axis_spans_processes_and_the_rest_stays_inside_one():
    two_hosts = [FakeDevice(i, i // 4) for i in range(8)]  # process 0: devices 0-3
    assert device_grid({"data": 2, "fsdp": 4}, {"data": 2}, two_hosts) == [[0, 1, 2, 3],
                                                                          [4, 5, 6, 7]]
    # fsdp across the hosts: each data row holds two devices of each host
    assert device_grid({"data": 2, "fsdp": 4}, {"fsdp": 2}, two_hosts) == [[0, 1, 4, 5],
                                                                          [2, 3, 6, 7]]


def test_dcn_uses_slices_where_devices_have_them():
    # two slices of two processes each: the slice, not the process, is the DCN unit
    devices = [FakeDevice(i, i // 2, slice_index=i // 4) for i in range(8)]
    assert device_grid({"data": 2, "fsdp": 4}, {"data": 2}, devices) == [[0, 1, 2, 3],
                                                                        [4, 5, 6, 7]]
    with pytest.raises(UserError, match="spans 4 slices but the devices are on 2"):
        device_grid({"data": 4, "fsdp": 2}, {"data": 4}, devices)


@pytest.mark.parametrize("sizes, dcn, message", [
    ({"data": 2, "fsdp": 4}, {"data": 2}, "mesh.dcn data=2 spans 2 processes but the devices are on 1"),
    ({"data": 2, "fsdp": 4}, {"fsdp": 3}, "mesh.dcn.fsdp=3 must be a positive divisor of mesh.fsdp=4"),
    ({"data": 8}, {"model": 2}, "unknown mesh axis mesh.dcn.model"),
])
def test_bad_dcn_sizes_say_what_is_wrong(sizes, dcn, message):
    with pytest.raises(UserError, match=message):
        make_mesh(sizes, devices_or_skip(8), dcn)


def test_dcn_of_ones_is_the_plain_mesh():
    devices = devices_or_skip(8)
    plain = make_mesh({"data": 2, "fsdp": 4}, devices)
    assert (make_mesh({"data": 2, "fsdp": 4}, devices, {"data": 1}).devices == plain.devices).all()
