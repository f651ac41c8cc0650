"""Model builders with torchvision's keyword arguments and state_dict layout."""
from .densenet import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet_bc_100
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .unet import unet

__all__ = ["ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "DenseNet", "densenet121",
           "densenet161", "densenet169", "densenet201", "densenet_bc_100", "unet"]
