"""Example Flower apps a site can host with ``client.training.flower_host``.

``flower_breast_cancer`` is one module (``client.examples.flower_breast_cancer:app``);
``flwr_app/`` is a whole project as ``flwr new`` lays it out, hosted from its directory
(``fedraft-client import ... --flower-app client/examples/flwr_app``). Its package
``cancerapp`` imports itself by that name, as Flower apps do, so it is loaded with the
project directory on sys.path, never as ``client.examples.flwr_app.cancerapp``.
"""
