"""The one rollout runner and the seams every mode plugs into.

``RolloutRunner`` drives the pure rollout machine (``canary.core.rollout``) for every mode:
static targets, annotated Deployments and cross-cluster rollouts. What differs between the
modes comes in through the Protocols in ``seams``. May import: ``canary.core``,
``analysis``, ``canary.routers.base``, ``canary.metrics.base``; never a supervisor
(``static``, ``kubernetes``, ``clusters``) or an entry point.
"""
