"""Model benchmarks: ResNet-18/50 training step (forward + backward) and inference,
DenseNet-121 and U-Net training steps; torchvision / plain torch vs skipfast."""
import pytest

from conftest import params


@pytest.mark.parametrize("case,provider,mode", params(["resnet18", "resnet50", "densenet121", "unet"]))
def test_model(run_case_bench, case, provider, mode):
    run_case_bench(case, provider, mode)
