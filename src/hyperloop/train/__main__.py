"""`torchrun --nproc-per-node N -m hyperloop.train --preset P --data D --out RUN ...`"""

from hyperloop.train.loop import main

main()
