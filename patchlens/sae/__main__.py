"""``python -m patchlens.sae``: train the zoo SAEs (see `patchlens.sae.zoo.main`)."""

from patchlens.sae.zoo import main

main()
