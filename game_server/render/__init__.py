"""Camera frames of the simulation: an adapter that reads SimState and draws the track scene offscreen."""

from game_server.render.renderer import FrameSpec, Renderer, shared_renderer

__all__ = ["FrameSpec", "Renderer", "shared_renderer"]
