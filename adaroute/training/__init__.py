"""Router training on calibration text: capture, shadow codes, sensitivity, losses, fit, distillation."""

from adaroute.training.trainer import TrainReport, calibrate, train_routers

__all__ = ["TrainReport", "calibrate", "train_routers"]
