"""Real-time path: message encoding, Redis publisher, subscription broker, in-process hub."""
