"""The CPU kernels when their scratch memory cannot be allocated: MemoryError (one line, the
kernel named), never a crash, and the next call computes the same integers as before. Every
allocation is made to fail in turn through the library's test hook (fail_allocation)."""

import pytest
import torch

from seqkv.engine import IntModel, cpu_kernels, integerize
from seqkv.engine.cpu_step import CpuStep

from .conftest import tiny_llama

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels here")


def _failures(run) -> dict[str, str]:
    """Run ``run()`` with its n-th allocation failing, n = 1, 2, ... until it allocates fewer
    (and succeeds): each kernel that failed and its message."""
    lib, seen = cpu_kernels.library(), {}
    for n in range(1, 500):
        lib.fail_allocation(n)
        try:
            run()
        except MemoryError as e:
            seen[str(e).split(":")[0].rsplit(" ", 1)[-1]] = str(e)
            continue
        finally:
            lib.fail_allocation(0)
        return seen
    raise AssertionError("a failing allocation was not reported")


@pytest.fixture
def two_threads():
    """The kernels' parallel loops run on two threads: their failure paths too."""
    was = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(was)


@needs_kernels
def test_every_kernel_allocation_failure_raises_and_leaves_nothing_broken(two_threads):
    model = IntModel(integerize(tiny_llama().model))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))

    def prefill():
        h = model.prefill_hidden(ids).reshape(-1, model.spec.hidden)
        return model.intervals(h, ids.reshape(-1))

    step = CpuStep.for_model(model)

    def steps():
        cache = step.new_cache(2, 12)
        return torch.stack([step.pmf(cache, ids[:, t], torch.full((2,), t)) for t in range(4)])

    want = prefill(), steps()
    seen = {**_failures(prefill), **_failures(steps)}
    assert set(seen) == cpu_kernels._ALLOCATING, seen
    for message in seen.values():
        assert "\n" not in message and "cannot allocate" in message
    got = prefill(), steps()
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True))
    assert torch.equal(got[1], want[1])


@needs_kernels
def test_an_allocation_past_the_address_space_raises_memory_error():
    """A real malloc failure (no hook): the GEMM's rows are 2**58 wide (a stride-0 view: no
    memory behind them), so its scratch is 2**59 bytes, past any machine's address space."""
    v = torch.zeros(1, 1, dtype=torch.int64).expand(1, 1 << 58)
    w = torch.ones(4, 8, dtype=torch.int8)
    with pytest.raises(MemoryError, match=r"kernel linear: cannot allocate 576,460,752,303,"):
        cpu_kernels.linear(v, w, torch.ones(2, dtype=torch.float64), None)


def test_the_cli_reports_memory_error_in_one_line(capsys):
    import typer

    from seqkv.cli.common import friendly_errors

    @friendly_errors
    def command():
        raise MemoryError("seqkv CPU kernel linear: cannot allocate 8 bytes of scratch memory")

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 1
    assert capsys.readouterr().err == ("seqkv: error: out of memory: seqkv CPU kernel linear: "
                                       "cannot allocate 8 bytes of scratch memory\n")
