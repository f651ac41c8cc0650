"""Op and block benchmarks: add_relu, the BN-add-ReLU tail, ResidualBlock,
BottleneckBlock, DenseBlock; eager / eager-cl / torch.compile / skipfast."""
import pytest

from conftest import params


@pytest.mark.parametrize("case,provider,mode",
                         params(["add_relu", "bn_add_relu", "ResidualBlock", "BottleneckBlock", "DenseBlock"]))
def test_block(run_case_bench, case, provider, mode):
    run_case_bench(case, provider, mode)
