"""Run an ONNX export (``mexify export --format onnx``) with onnxruntime and numpy: no torch.

The runner is what goes onto an edge box: ``pip install onnxruntime numpy pyyaml`` and the export
directory. It runs the stages one by one, evaluates each exit the policy can take (the head and
the policy's image score are one ONNX graph), drops the images that leave from every value
carried to the next stage, and writes each image's mask at the exit it left by::

    from mexify.deploy import Runner
    runner = Runner("seg.onnx.mex")
    result = runner.predict(runner.normalize(images))  # images: uint8 (N, H, W, 3)
    result.masks, result.exit_index, result.confidence

Nothing here imports torch (checked by the import contracts and by a test in a fresh interpreter).
"""
from mexify.deploy.runner import Result, Runner

__all__ = ["Runner", "Result"]
