"""A Temenos Transact (IRIS REST) simulator with scripted faults, for tests and demos."""

from regstream.core_banking.simulator.app import API_PREFIX, SimulatorConfig, create_simulator_app
from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS, DemoApplicant
from regstream.core_banking.simulator.server import (
    RunningSimulator,
    SimulatorTls,
    run_simulator,
    serve_in_thread,
)

__all__ = [
    "API_PREFIX",
    "DEMO_APPLICANTS",
    "DemoApplicant",
    "RunningSimulator",
    "SimulatorConfig",
    "SimulatorTls",
    "create_simulator_app",
    "run_simulator",
    "serve_in_thread",
]
