"""Test defaults: CPU only (libtpu is installed for AOT compilation but there is no TPU here)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
