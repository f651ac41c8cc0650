"""U-Net builder."""
from ..nn.unet import UNet


def unet(in_channels: int = 3, out_channels: int = 1, base_channels: int = 64, depth: int = 4) -> UNet:
    return UNet(in_channels, out_channels, base_channels, depth)
