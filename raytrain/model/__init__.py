"""Network: timm backbone registry, box positional encoding, RoI fusion, iterative decoders."""
from .backbones import BACKBONES, create_backbone, list_backbones, load_backbone_weights
from .decoders import CameraDecoder, IterativeRegressor, MeshDecoder, ProjectionHead
from .encoding import box_encoding, encoding_dim, positional_encoding
from .fusion import FUSIONS, Fusion, create_fusion, list_fusions
from .network import (
                      IMAGENET_MEAN,
                      IMAGENET_STD,
                      MultiRoINet,
                      build_model,
                      default_mean_params,
                      normalize_images,
)
