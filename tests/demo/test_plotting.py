"""The pictures the demo draws itself (`cosmos3.demo.plotting`): examples and the action plot, without gradio."""

import numpy as np
import pytest

from cosmos3.demo.plotting import action_labels, draw_landscape, draw_tabletop, plot_actions


def test_plot_actions():
    plot = plot_actions(np.sin(np.linspace(0, 3, 40)).reshape(20, 2), ["x", "y"], title="t")
    assert plot.size == (720, 380) and np.asarray(plot).min() < 100
    assert plot_actions(np.zeros((1, 30))).size == (720, 380)  # one step, constant, many channels
    assert plot_actions([[np.nan, 1.0], [2.0, np.inf]]).size == (720, 380)
    with pytest.raises(ValueError, match=r"\[T >= 1, D >= 1\]"):
        plot_actions(np.zeros(5))


def test_plot_draws_each_channel_in_its_colour():
    rising = np.linspace(0.0, 1.0, 8)[:, None]
    one, two = np.asarray(plot_actions(rising)), np.asarray(plot_actions(np.hstack([rising, -rising])))
    blue, orange = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # the first two palette colours
    assert (one == blue).all(-1).any() and not (one == orange).all(-1).any()
    assert (two == orange).all(-1).any()


def test_action_labels_follow_the_embodiment_layout():
    assert action_labels("droid_lerobot", 10)[-1] == "arm.gripper"
    assert action_labels("libero", 7) == [f"a{i}" for i in range(7)]  # no layout of that width: numbered


def test_examples_are_drawn_the_same_every_time():
    for draw in (draw_tabletop, draw_landscape):
        image = draw()
        assert (image.mode, image.size) == ("RGB", (256, 256))
        assert np.array_equal(np.asarray(image), np.asarray(draw()))
        assert draw(64).size == (64, 64)
    cube = np.asarray(draw_tabletop())[170, 80]  # the red cube sits at (60..100, 150..190) of the 256 canvas
    assert tuple(cube) == (200, 30, 30)
