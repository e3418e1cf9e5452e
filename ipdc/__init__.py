"""IPDC: InterPlanetary Distributed Computing.

MapReduce and TensorFlow clusters over a private IPFS (kubo) swarm, coordinated
on MQTT (mosquitto). See README.md for the tour.
"""

__version__ = "0.1.0"
