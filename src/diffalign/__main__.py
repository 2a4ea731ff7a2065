"""`python -m diffalign …` is `diffalign …`; also `accelerate launch -m diffalign …` and `torchrun -m diffalign …`."""

from diffalign.cli import main

main()
