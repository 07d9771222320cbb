"""The demo models' names, as their families declare them."""

from families.flux import FluxFamily
from families.sd15 import SD15Family
from families.sdxl import SDXLFamily

DEMO_SDXL_NAME = SDXLFamily.demo_name
DEMO_FLUX_NAME = FluxFamily.demo_name
DEMO_SD15_NAME = SD15Family.demo_name
