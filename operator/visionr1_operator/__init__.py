"""visionr1 control plane: the VisionR1Run API, stage planning and the kopf operator."""

__version__ = "0.1.0"
