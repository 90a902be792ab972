"""Task artifacts and registry (safetensors + manifest, atomic publish); filled by the adapter-store issue."""
