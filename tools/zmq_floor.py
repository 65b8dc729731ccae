"""This host's floor for one ZeroMQ hop at 1 kHz: ``python tools/zmq_floor.py`` runs
``python -m lhtstream.service.zmq_floor`` (the module `lhtstream bench` uses)."""

from lhtstream.service.zmq_floor import main

if __name__ == "__main__":
    main()
