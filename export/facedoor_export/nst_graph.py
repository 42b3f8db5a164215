"""TensorFlow functions for neural style transfer that tf2onnx can convert, gradient included.

ONNX Runtime cannot differentiate and tf2onnx cannot convert TensorFlow's gradient ops
(ReluGrad, AvgPoolGrad, ShapeN, BroadcastGradientArgs), so `NSTGraph.step` writes the backward
pass by hand from ordinary ops: a convolution's input gradient is a convolution with the kernel
rotated 180 degrees and its in/out channels swapped (exact for stride 1 and SAME padding, and a
plain Conv in ONNX, which ONNX Runtime runs faster than ConvTranspose); ReLU backward is a mask;
the 2x2/2 VALID average-pool backward is a nearest 2x upsample (Resize) of g/4, padded with
zeros back to an odd size; the content and Gram gradients are analytic. `NSTGraph.autodiff` is
the same loss written plainly and differentiated by TensorFlow: the export checks the two
against each other.

Costs (Gatys et al., as in the exercise), activations A of a layer unrolled to (nH*nW, nC):
  J_content = sum_l wc_l / (4 nH nW nC) * sum (A_C - A_G)^2
  J_style   = sum_l ws_l / (4 nC^2 (nH nW)^2) * sum (G_S - G_G)^2,   G = A^T A
  J_tv      = (sum (x[i+1,j]-x[i,j])^2 + sum (x[i,j+1]-x[i,j])^2) / (H W 3)   (RGB pixels)
  J         = alpha J_content + beta J_style + tv_weight J_tv
The image input is RGB in [0, 255], NHWC, batch 1; the graph subtracts the ImageNet means and
conv1_1's input channels are reversed, so the Keras (Caffe, BGR) weights see what they expect.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from facedoor_export.vgg19 import IMAGENET_MEAN_RGB, PLAN, VGGWeights

DEFAULT_CONTENT_LAYERS = ("conv4_2",)
DEFAULT_STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")


class NSTGraph:
    """The VGG-19 stack (average pooling) with the loss and its hand-written gradient."""

    def __init__(self, weights: VGGWeights, content_layers: Sequence[str] = DEFAULT_CONTENT_LAYERS,
                 style_layers: Sequence[str] = DEFAULT_STYLE_LAYERS, layout: str = "NCHW"):
        self.layout = layout  # of the activations; NCHW converts to ONNX without any Transpose
        self.nchw = layout == "NCHW"
        self.content_layers = tuple(content_layers)
        self.style_layers = tuple(style_layers)
        wanted = set(self.content_layers) | set(self.style_layers)
        order = [s[0] for s in PLAN if not isinstance(s, str)]
        unknown = wanted - set(order)
        if unknown or not self.style_layers or not self.content_layers:
            raise ValueError(f"layers must be among {', '.join(order)}; got {sorted(unknown)}")
        last = max(order.index(name) for name in wanted)
        self.plan: list[tuple[str, int, int] | str] = []
        for step in PLAN:
            self.plan.append(step)
            if not isinstance(step, str) and step[0] == order[last]:
                break
        self.kernels, self.back_kernels, self.biases = {}, {}, {}
        for step in self.plan:
            if isinstance(step, str):
                continue
            kernel, bias = weights.layers[step[0]]
            if step[0] == "conv1_1":
                kernel = kernel[:, :, ::-1, :]  # BGR weights, RGB input
            # numpy here, tf.constant inside the traced function: constants, not captured inputs
            self.kernels[step[0]] = np.ascontiguousarray(kernel)
            # dX = conv(dZ, K rotated 180 degrees with in/out swapped): [3,3,out,in]
            self.back_kernels[step[0]] = np.ascontiguousarray(
                kernel[::-1, ::-1].transpose(0, 1, 3, 2))
            self.biases[step[0]] = bias
        self.mean = np.array(IMAGENET_MEAN_RGB, np.float32).reshape(1, 1, 1, 3)

    # -- signatures -------------------------------------------------------------------------
    def _act_shape(self, name: str) -> list[int | None]:
        c = self._channels(name)
        return [1, c, None, None] if self.nchw else [1, None, None, c]

    def feature_signature(self) -> list[Any]:
        import tensorflow as tf

        return [tf.TensorSpec([1, None, None, 3], tf.float32, name="image")]

    def feature_names(self) -> list[str]:
        return [f"content_{n}" for n in self.content_layers] + \
               [f"style_{n}" for n in self.style_layers]

    def step_signature(self) -> list[Any]:
        import tensorflow as tf

        specs = [tf.TensorSpec([1, None, None, 3], tf.float32, name="image")]
        for name in self.content_layers:
            specs.append(tf.TensorSpec(self._act_shape(name), tf.float32, name=f"content_{name}"))
        for name in self.style_layers:
            c = self._channels(name)
            specs.append(tf.TensorSpec([c, c], tf.float32, name=f"gram_{name}"))
        specs += [
            tf.TensorSpec([len(self.content_layers)], tf.float32, name="content_weights"),
            tf.TensorSpec([len(self.style_layers)], tf.float32, name="style_weights"),
            tf.TensorSpec([], tf.float32, name="alpha"),
            tf.TensorSpec([], tf.float32, name="beta"),
            tf.TensorSpec([], tf.float32, name="tv_weight"),
        ]
        return specs

    step_outputs = ("J", "J_content", "J_style", "J_tv", "grad")

    def _channels(self, name: str) -> int:
        return next(s[2] for s in PLAN if not isinstance(s, str) and s[0] == name)

    # -- forward ----------------------------------------------------------------------------
    def _forward(self, image: Any) -> tuple[dict[str, Any], list[Any]]:
        """Activations by layer name, and the input of every plan step (for the backward)."""
        import tensorflow as tf

        h = image - tf.constant(self.mean)
        if self.nchw:
            h = tf.transpose(h, [0, 3, 1, 2])
        acts, inputs = {}, []
        for step in self.plan:
            inputs.append(h)
            if isinstance(step, str):
                h = tf.nn.avg_pool2d(h, 2, 2, "VALID", data_format=self.layout)
            else:
                z = tf.nn.conv2d(h, tf.constant(self.kernels[step[0]]), 1, "SAME",
                                 data_format=self.layout)
                h = tf.nn.relu(tf.nn.bias_add(z, tf.constant(self.biases[step[0]]),
                                              data_format=self.layout))
                acts[step[0]] = h
        return acts, inputs

    def features(self, image: Any) -> tuple[Any, ...]:
        """Activations of the content layers, then of the style layers (in `layout`)."""
        acts, _ = self._forward(image)
        return tuple(acts[n] for n in (*self.content_layers, *self.style_layers))

    def _unroll(self, a: Any, name: str) -> Any:
        """Activations as (nC, nH*nW): G = F F^T."""
        import tensorflow as tf

        c = self._channels(name)
        if self.nchw:
            return tf.reshape(a, [c, -1])
        return tf.transpose(tf.reshape(a, [-1, c]))

    # -- loss + hand-written gradient -------------------------------------------------------
    def step(self, image: Any, *args: Any) -> tuple[Any, ...]:
        """(J, J_content, J_style, J_tv, dJ/dimage) using only ops ONNX has."""
        import tensorflow as tf

        nc, ns = len(self.content_layers), len(self.style_layers)
        content_targets, grams = args[:nc], args[nc:nc + ns]
        content_w, style_w, alpha, beta, tv_weight = args[nc + ns:]
        acts, inputs = self._forward(image)
        injected: dict[str, Any] = {}
        j_content = tf.constant(0.0)
        for i, name in enumerate(self.content_layers):
            j, grad = content_cost_and_grad(acts[name], content_targets[i])
            j_content += content_w[i] * j
            injected[name] = grad * (alpha * content_w[i])
        j_style = tf.constant(0.0)
        for i, name in enumerate(self.style_layers):
            a = acts[name]
            j, grad_flat = style_cost_and_grad(self._unroll(a, name), grams[i],
                                               beta * style_w[i])
            j_style += style_w[i] * j
            if not self.nchw:
                grad_flat = tf.transpose(grad_flat)
            g = tf.reshape(grad_flat, tf.shape(a))
            injected[name] = injected[name] + g if name in injected else g
        j_tv, grad_tv = total_variation(image)
        total = alpha * j_content + beta * j_style + tv_weight * j_tv

        g = None
        for step, x in zip(reversed(self.plan), reversed(inputs)):
            if isinstance(step, str):
                g = self.avg_pool_backward(g, x)
                continue
            name = step[0]
            if name in injected:
                g = injected[name] if g is None else g + injected[name]
            dz = g * tf.cast(acts[name] > 0.0, tf.float32)  # ReLU mask
            g = tf.nn.conv2d(dz, tf.constant(self.back_kernels[name]), 1, "SAME",
                             data_format=self.layout)
        if self.nchw:
            g = tf.transpose(g, [0, 2, 3, 1])
        grad = g + tv_weight * grad_tv
        return total, j_content, j_style, j_tv, grad

    def avg_pool_backward(self, g: Any, x: Any) -> Any:
        """Gradient of a 2x2 stride-2 VALID average pool: each input of a window gets g/4; the
        last row/column of an odd-sized input belongs to no window and gets 0."""
        import tensorflow as tf

        g = g * 0.25  # on the small side, before upsampling
        to_nhwc, to_nchw = [0, 2, 3, 1], [0, 3, 1, 2]
        if self.nchw:  # TensorFlow resizes NHWC; tf2onnx cancels the transposes (NCHW Resize)
            g = tf.transpose(g, to_nhwc)
        size = tf.shape(g)[1:3] * 2
        up = tf.raw_ops.ResizeNearestNeighbor(images=g, size=size, align_corners=False,
                                              half_pixel_centers=False)
        full = tf.shape(x)
        if self.nchw:
            up = tf.transpose(up, to_nchw)
            pads = [[0, 0], [0, 0], [0, full[2] - size[0]], [0, full[3] - size[1]]]
        else:
            pads = [[0, 0], [0, full[1] - size[0]], [0, full[2] - size[1]], [0, 0]]
        return tf.pad(up, pads)

    # -- reference: the same loss, differentiated by TensorFlow ----------------------------
    def autodiff(self, image: Any, *args: Any) -> tuple[Any, ...]:
        """The loss of `step` written plainly; gradient by tf.GradientTape (NHWC reference)."""
        import tensorflow as tf

        nc, ns = len(self.content_layers), len(self.style_layers)
        content_targets, grams = args[:nc], args[nc:nc + ns]
        content_w, style_w, alpha, beta, tv_weight = args[nc + ns:]
        with tf.GradientTape() as tape:
            tape.watch(image)
            acts, _ = self._forward(image)
            j_content = tf.add_n([
                content_w[i] * content_cost(content_targets[i], acts[n])
                for i, n in enumerate(self.content_layers)])
            j_style = tf.add_n([
                style_w[i] * layer_style_cost(acts[n], grams[i], self.layout)
                for i, n in enumerate(self.style_layers)])
            j_tv = total_variation(image)[0]
            total = alpha * j_content + beta * j_style + tv_weight * j_tv
        return total, j_content, j_style, j_tv, tape.gradient(total, image)


def content_cost(a_c: Any, a_g: Any) -> Any:
    """J_content = 1/(4 nH nW nC) sum (a_C - a_G)^2 (as the exercise)."""
    import tensorflow as tf

    return tf.reduce_sum(tf.square(a_c - a_g)) / (4.0 * tf.cast(tf.size(a_g), a_g.dtype))


def content_cost_and_grad(a_g: Any, a_c: Any) -> tuple[Any, Any]:
    """(J_content, dJ_content/da_G) = (sum (a_G - a_C)^2 / (4 n), (a_G - a_C) / (2 n))."""
    import tensorflow as tf

    diff = a_g - a_c
    scale = 1.0 / (4.0 * tf.cast(tf.size(a_g), a_g.dtype))
    return scale * tf.reduce_sum(tf.square(diff)), diff * (2.0 * scale)


def style_cost_and_grad(flat: Any, gram_s: Any, grad_scale: Any = 1.0) -> tuple[Any, Any]:
    """(J_style of one layer, grad_scale * dJ/dF) for activations F unrolled to (nC, nH*nW).

    J = sum (F F^T - G_S)^2 / (4 nC^2 M^2); dJ/dF = 4 (G - G_S) F / (4 nC^2 M^2), G symmetric.
    The scale is applied to the (nC, nC) matrix, not to the large gradient.
    """
    import tensorflow as tf

    shape = tf.cast(tf.shape(flat), flat.dtype)
    c, m = shape[0], shape[1]
    scale = 1.0 / (4.0 * c * c * m * m)
    gdiff = tf.matmul(flat, flat, transpose_b=True) - gram_s
    j = scale * tf.reduce_sum(tf.square(gdiff))
    return j, tf.matmul(gdiff * (grad_scale * 4.0 * scale), flat)


def gram(a: Any, layout: str = "NHWC") -> Any:
    """G = A^T A over the activations unrolled to (nH*nW, nC)."""
    import tensorflow as tf

    if layout == "NCHW":
        a = tf.transpose(a, [0, 2, 3, 1])
    flat = tf.reshape(a, [-1, tf.shape(a)[-1]])
    return tf.matmul(flat, flat, transpose_a=True)


def layer_style_cost(a_g: Any, gram_s: Any, layout: str = "NHWC") -> Any:
    """J_style(layer) = 1/(4 nC^2 (nH nW)^2) sum (G_S - G_G)^2 (as the exercise)."""
    import tensorflow as tf

    size = tf.cast(tf.size(a_g), a_g.dtype)
    c = tf.cast(tf.shape(a_g)[1 if layout == "NCHW" else 3], a_g.dtype)
    m = size / c
    return tf.reduce_sum(tf.square(gram_s - gram(a_g, layout))) / (4.0 * c * c * m * m)


def total_variation(image: Any) -> tuple[Any, Any]:
    """(J_tv, dJ_tv/dimage): squared neighbour differences per pixel and channel (NHWC)."""
    import tensorflow as tf

    shape = tf.cast(tf.shape(image), image.dtype)
    norm = 1.0 / (shape[1] * shape[2] * 3.0)
    dh = image[:, 1:, :, :] - image[:, :-1, :, :]
    dw = image[:, :, 1:, :] - image[:, :, :-1, :]
    j = (tf.reduce_sum(tf.square(dh)) + tf.reduce_sum(tf.square(dw))) * norm
    zero = [0, 0]
    grad_h = tf.pad(dh, [zero, [1, 0], zero, zero]) - tf.pad(dh, [zero, [0, 1], zero, zero])
    grad_w = tf.pad(dw, [zero, zero, [1, 0], zero]) - tf.pad(dw, [zero, zero, [0, 1], zero])
    return j, 2.0 * norm * (grad_h + grad_w)
