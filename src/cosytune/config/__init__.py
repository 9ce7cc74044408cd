"""Typed run configs, loaded strictly (see :mod:`cosytune.config.loading`)."""

from cosytune.config.loading import config_to_dict, dump_config, load_config

__all__ = ["config_to_dict", "dump_config", "load_config"]
