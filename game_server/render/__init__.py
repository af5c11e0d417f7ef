"""Camera frames of the simulation: an adapter that reads SimState and has ursina draw the track offscreen."""

from game_server.render.renderer import FrameSpec, Renderer, shared_renderer

__all__ = ["FrameSpec", "Renderer", "shared_renderer"]
