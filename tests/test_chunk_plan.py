"""Host side of the fused backends, on CPU: chunk tables, table layouts, kernel routing."""

import dataclasses
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from largedet_kernels import PMDLAMB
from largedet_kernels.backends import Bucket, chunk_plan, tables

ROOT = Path(__file__).resolve().parent.parent


class _Kernels:
    """The dtype pairs a fused backend's kernels take: all of them (Triton's), unless told otherwise."""

    def __init__(self, takes=lambda param_dtype, grad_dtype: True) -> None:
        self.takes = takes


def test_chunk_layout():
    numels, chunk = [0, 1, 7, 8, 9, 25], 8
    chunk_tensor, chunk_index, first, counts = chunk_plan.chunk_layout(numels, chunk)
    assert counts == [max(1, math.ceil(n / chunk)) for n in numels] == [1, 1, 1, 1, 2, 4]
    assert first == [0, 1, 2, 3, 4, 6]
    assert chunk_tensor == [0, 1, 2, 3, 4, 4, 5, 5, 5, 5]
    assert chunk_index == [0, 0, 0, 0, 0, 1, 0, 1, 2, 3]
    for i, n in enumerate(numels):  # every element in exactly one chunk
        covered = sum(min(chunk, n - j * chunk) for t, j in zip(chunk_tensor, chunk_index) if t == i)
        assert covered == n


def test_sizes_stay_64_bit():
    # 3·2^31 elements: chunk starts beyond 2^32 elements; numel travels as int64.
    _, chunk_index, _, counts = chunk_plan.chunk_layout([3 << 31], 1 << 20)
    assert counts == [3 << 11] and max(chunk_index) * (1 << 20) > 2**32
    bucket = Bucket(torch.device("cpu"), params=[torch.empty(5)])
    assert chunk_plan.plan_for(bucket, 16).numels.dtype == torch.int64


def test_hyper_columns_agree_across_languages():
    from largedet_kernels import triton_kernels

    triton_names = ["LR_ALPHA", "BETA1", "BETA2", "WEIGHT_G", "WEIGHT_G2", "EPS", "WEIGHT_DECAY", "CYCLE",
                    "BIAS_CORRECTION", "EPS_INSIDE_SQRT", "ADAM_W_MODE", "USE_TRUST_RATIO", "STOCHASTIC_ROUNDING",
                    "SEED", "MAXIMIZE", "TRUST_RATIO_MIN", "TRUST_RATIO_MAX"]  # fmt: skip
    assert [getattr(triton_kernels, n).value for n in triton_names] == list(range(len(tables.HYPER_COLUMNS)))
    assert triton_kernels.N_HYPER.value == len(tables.HYPER_COLUMNS)
    header = (ROOT / "csrc/tables.h").read_text()
    cuda = dict((name, int(v)) for name, v in re.findall(r"^\s+k(\w+) = (\d+),", header, re.M))
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in cuda.items()}
    for i, column in enumerate(tables.HYPER_COLUMNS):
        assert snake[column] == i, column
    assert snake["hyper_columns"] == len(tables.HYPER_COLUMNS)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_packed_chunk_tables_agree_across_languages():
    header = (ROOT / "csrc/tables.h").read_text()
    for enum, parts in (("ChunkTablePart", tables.CHUNK_TABLE_PARTS), ("WorkspacePart", tables.WORKSPACE_PARTS)):
        body = re.search(rf"enum {enum} : int \{{([^}}]*)\}}", header).group(1)
        values = {_snake(name): int(v) for name, v in re.findall(r"k(\w+) = (\d+)", body)}
        assert values.pop(_snake(enum) + "s") == len(parts)
        assert sorted(values, key=values.get) == list(parts)
    # The plan packs the parts in that order, at the offsets of csrc/tables.h's part_offset.
    numels = [0, 7, 9, 25]
    bucket = Bucket(torch.device("cpu"), params=[torch.empty(n) for n in numels])
    plan = chunk_plan.plan_for(bucket, 8)
    layout = dict(zip(tables.CHUNK_TABLE_PARTS, chunk_plan.chunk_layout(numels, 8)))
    n_chunks, n = len(layout["chunk_tensor"]), len(numels)
    offsets = dict(chunk_tensor=0, chunk_index=n_chunks, first_chunk=2 * n_chunks, chunk_count=2 * n_chunks + n)
    assert plan.chunks.dtype == torch.int32 and plan.chunks.numel() == 2 * (n_chunks + n)
    for part in tables.CHUNK_TABLE_PARTS:
        assert plan.chunks[offsets[part] : offsets[part] + len(layout[part])].tolist() == layout[part], part
        assert getattr(plan, part).tolist() == layout[part], part
    assert plan.pair_chunks[: 2 * n_chunks].equal(plan.chunks[: 2 * n_chunks])
    assert plan.pair_chunks[2 * n_chunks :].tolist() == list(range(n)) + [1] * n
    assert plan.workspace.numel() == 2 * n_chunks + n and plan.partials.numel() == 2 * n_chunks
    assert plan.t_now.data_ptr() == plan.workspace.data_ptr() + 2 * n_chunks * plan.workspace.element_size()


def test_record_fields_agree_across_languages():
    from largedet_kernels import telemetry, triton_kernels

    body = re.search(r"enum RecordField : int \{([^}]*)\}", (ROOT / "csrc/tables.h").read_text()).group(1)
    cuda = {_snake(name).removeprefix("record_"): int(v) for name, v in re.findall(r"k(\w+) = (\d+)", body)}
    assert cuda.pop("fields") == len(tables.RECORD_FIELDS)
    assert sorted(cuda, key=cuda.get) == ["step", "x_norm", "u_norm", "ratio"] == list(tables.RECORD_FIELDS)
    names = {field: getattr(triton_kernels, "RECORD_" + field.upper()).value for field in tables.RECORD_FIELDS}
    assert names == cuda and triton_kernels.N_RECORD.value == len(tables.RECORD_FIELDS)
    # The host reads a record by the same names.
    assert [f.name for f in dataclasses.fields(telemetry.Record)] == list(tables.RECORD_FIELDS)


def test_pointer_rows_agree_across_languages():
    from largedet_kernels import triton_kernels

    enum = re.search(r"enum PointerRow : int \{([^}]*)\}", (ROOT / "csrc/tables.h").read_text()).group(1)
    cuda = {name: int(v) for name, v in re.findall(r"k(\w+) = (\d+)", enum)}
    rows = {name: getattr(triton_kernels, name.upper()).value for name in ("X", "G", "M", "V", "Step", "Master")}
    assert rows == {name: cuda[name] for name in rows} and cuda["PointerRows"] == len(rows)
    assert [name.lower() for name in sorted(rows, key=rows.get)] == list(tables.POINTER_ROWS)
    # The table the host builds: one row of addresses each, the master row 0 in a bucket without masters.
    xs = [torch.randn(3), torch.randn(5)]
    bucket = Bucket(torch.device("cpu"), params=xs, grads=[torch.randn_like(x) for x in xs],
                    exp_avgs=[torch.zeros_like(x) for x in xs], exp_avg_sqs=[torch.zeros_like(x) for x in xs],
                    steps=[torch.zeros(()) for _ in xs])  # fmt: skip
    plan = chunk_plan.plan_for(bucket, 16)
    table = plan.pointers(bucket).view(len(rows), len(xs))
    assert table[rows["X"]].tolist() == [x.data_ptr() for x in xs]
    assert table[rows["Step"]].tolist() == [s.data_ptr() for s in bucket.steps]
    assert table[rows["Master"]].tolist() == [0, 0]
    bucket.masters = [x.clone() for x in xs]
    table = plan.pointers(bucket).view(len(rows), len(xs))
    assert table[rows["Master"]].tolist() == [m.data_ptr() for m in bucket.masters]


def test_hyper_row_follows_the_group():
    group = PMDLAMB([torch.nn.Parameter(torch.zeros(1))], lr=0.5, alpha=0.1, weight_decay=0.0).param_groups[0]
    row = dict(zip(tables.HYPER_COLUMNS, tables.hyper_row(group)))
    assert row["lr_alpha"] == 0.5 * 0.1 and row["cycle_length"] == 200 and row["use_trust_ratio"]
    assert row["weight_g"] == 1 - 0.9 and row["weight_g2"] == 1 - 0.999
    assert (row["trust_ratio_min"], row["trust_ratio_max"], row["maximize"]) == (0.0, math.inf, False)
    group.update(cycle_length=None, use_nvlamb=False, grad_averaging=False, adapt=None)
    row = dict(zip(tables.HYPER_COLUMNS, tables.hyper_row(group)))
    assert row["cycle_length"] == 0 and not row["use_trust_ratio"]  # LAMB: no trust ratio without decay
    assert row["weight_g"] == 1.0 and row["weight_g2"] == 1 - 0.999
    group.update(adapt=True, trust_ratio_bounds=(0.01, 10.0), maximize=True)  # adapt overrides apex's rule
    row = dict(zip(tables.HYPER_COLUMNS, tables.hyper_row(group)))
    assert row["use_trust_ratio"] and row["maximize"]
    assert (row["trust_ratio_min"], row["trust_ratio_max"]) == (0.01, 10.0)
    group.update(adapt=False, weight_decay=0.1, use_nvlamb=True)
    assert not dict(zip(tables.HYPER_COLUMNS, tables.hyper_row(group)))["use_trust_ratio"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_hyper_table_is_float64_whatever_the_parameters(dtype):
    # NOTE [double coefficients]: β2 = 0.999 in float32 would make 1−β2 off by 1.3e-5.
    group = PMDLAMB([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 0.999)).param_groups[0]
    bucket = Bucket(torch.device("cpu"), params=[torch.randn(5, dtype=dtype)], groups=[group])
    table = chunk_plan.plan_for(bucket, 16).hyper(bucket)
    assert table.dtype == torch.float64
    row = dict(zip(tables.HYPER_COLUMNS, table[0].tolist()))
    assert row["beta2"] == 0.999 and row["weight_g2"] == 1 - 0.999


def test_split_sends_strided_tensors_to_the_torch_backend():
    dense, strided = torch.randn(6), torch.randn(4, 4)[:, ::2]
    bucket = Bucket(torch.device("cpu"))
    for x in (dense, strided):
        bucket.params.append(x)
        bucket.grads.append(torch.randn_like(x))
        bucket.exp_avgs.append(torch.zeros_like(x))
        bucket.exp_avg_sqs.append(torch.zeros_like(x))
        bucket.steps.append(torch.zeros(()))
        bucket.groups.append({})
    kernel_part, rest = chunk_plan.split(bucket, _Kernels())
    assert kernel_part.params == [dense] and rest.params == [strided]
    assert kernel_part.kept is bucket.kept


def test_split_sends_dtypes_without_kernels_to_the_torch_backend():
    # fp32 parameters with bf16 gradients: no C++ instantiation, so the whole bucket goes to the torch backend.
    xs = [torch.randn(6), torch.randn(3)]
    bucket = Bucket(torch.device("cpu"), params=xs, grads=[torch.randn_like(x).bfloat16() for x in xs],
                    exp_avgs=[torch.zeros_like(x) for x in xs], exp_avg_sqs=[torch.zeros_like(x) for x in xs],
                    steps=[torch.zeros(()) for _ in xs], groups=[{}, {}])  # fmt: skip
    kernel_part, rest = chunk_plan.split(bucket, _Kernels(tables.has_kernels))
    assert kernel_part.params == [] and rest.params == xs
    kernel_part, rest = chunk_plan.split(Bucket(**{**vars(bucket), "split": None}), _Kernels())
    assert kernel_part is not None and rest is None


def test_plan_is_rebuilt_only_when_sizes_change():
    bucket = Bucket(torch.device("cpu"))
    for n in (3, 40):
        bucket.params.append(torch.randn(n))
    plan = chunk_plan.plan_for(bucket, 16)
    assert chunk_plan.plan_for(bucket, 16) is plan
    bucket.params[1] = torch.randn(41)
    assert chunk_plan.plan_for(bucket, 16) is not plan


def test_tables_are_not_rebuilt_during_graph_capture(monkeypatch):
    # A replay runs no Python: a table change under capture must fail loudly, not replay stale or freed memory.
    bucket = Bucket(torch.device("cpu"), params=[torch.randn(4)], grads=[torch.randn(4)], exp_avgs=[torch.zeros(4)],
                    exp_avg_sqs=[torch.zeros(4)], steps=[torch.zeros(())],
                    groups=[PMDLAMB([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]])  # fmt: skip
    plan = chunk_plan.plan_for(bucket, 16)
    plan.pointers(bucket), plan.hyper(bucket)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    plan.pointers(bucket), plan.hyper(bucket)  # unchanged: fine
    bucket.groups[0]["lr"] = 0.5
    with pytest.raises(RuntimeError, match="hyper-parameter.*CUDA graph"):
        plan.hyper(bucket)
    bucket.grads[0] = torch.randn(4)
    with pytest.raises(RuntimeError, match="address.*CUDA graph"):
        plan.pointers(bucket)


# The dtype pairs stated in Python (tables.has_kernels) are exactly those the C++ kernels take: the CPU
# kernels' and the CUDA kernels' (emulated), each asked every pair through its op.
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.mark.parametrize("namespace", ["largedet", "largedet_emulated"], ids=["cpu", "cuda-emulated"])
def test_the_kernels_take_exactly_the_dtype_pairs_of_has_kernels(cuda_emulator, namespace):
    from harness import make_bucket

    from largedet_kernels.backends import cpu, cuda

    assert cpu.unavailable_reason(torch.device("cpu")) is None
    chunk = cpu.CHUNK if namespace == "largedet" else cuda.CHUNK
    group = PMDLAMB([torch.zeros(1)]).param_groups[0]
    taken = {}
    for x, g in itertools.product(FLOATS, FLOATS):
        bucket = make_bucket([torch.randn(5, dtype=x)], group)
        bucket.grads = [torch.randn(5, dtype=g)]
        plan = chunk_plan.plan_for(bucket, chunk)
        try:
            getattr(torch.ops, namespace).step_(bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                                                bucket.steps, [], plan.chunks, plan.workspace, plan.chunk,
                                                plan.hyper(bucket), plan.one, plan.zero)  # fmt: skip
            taken[x, g] = True
        except RuntimeError as err:
            assert "no kernel for" in str(err), err
            taken[x, g] = False
    assert taken == {(x, g): tables.has_kernels(x, g) for x, g in itertools.product(FLOATS, FLOATS)}
