"""Network: timm backbone registry, box positional encoding, RoI fusion, iterative decoders."""
from .backbones import create_backbone, list_backbones, load_backbone_weights, register_backbone
from .decoders import CameraDecoder, IterativeRegressor, MeshDecoder, ProjectionHead
from .encoding import box_encoding, encoding_dim, positional_encoding
from .fusion import Fusion, create_fusion, list_fusions, register_fusion
from .network import (
                      IMAGENET_MEAN,
                      IMAGENET_STD,
                      ModelSpec,
                      MultiRoINet,
                      build_model,
                      default_mean_params,
                      normalize_images,
)
