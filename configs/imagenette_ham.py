"""HAM on Imagenette (160px images resized to 32x32) with PreAct-ResNet-18.

    python launch.py --config=configs/imagenette_ham.py --workdir=runs/imagenette_ham

The same as `--config=configs/imagenette.py:method=ham` (see configs/imagenette.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "imagenette.py", "method=ham")
