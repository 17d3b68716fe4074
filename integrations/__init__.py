"""Adapters that run the cycle where users already train: thin layers over :class:`~cycdata.loaders.CyclicalLoader`
and :class:`~cycdata.train.hooks.CyclicalHooks`.

* :mod:`cycdata.integrations.lightning`: ``CyclicalCallback``, for Lightning (``pip install cycdata[lightning]``);
* :mod:`cycdata.integrations.hf`: ``CyclicalTrainer``, a transformers ``Trainer`` (``pip install cycdata[hf]``);
* :mod:`cycdata.integrations.accelerate`: the loader under ``accelerate`` (``pip install cycdata[hf]``);
* :mod:`cycdata.integrations.reference`: the reference code's (lnsmith54/CFL, a timm patch) flags as a cycdata config.

Each framework is imported only by its own module, with a one-line error naming the extra when it is missing.
"""
