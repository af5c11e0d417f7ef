"""Pure game core: tracks, car physics, sensors and lap timing. Imports no grpc, redis or ursina."""
