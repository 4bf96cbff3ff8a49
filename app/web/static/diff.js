// Compare: the per-pixel |base - patch| image and its mean, computed in the page from the two PNGs.
"use strict";

function decoded(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiError(0, "an image could not be decoded", "bad_image"));
    img.src = src;
  });
}

function pixels(img) {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

/** {src, mean}: |a - b| per pixel (brightest channel, scaled so the largest difference is white), mean |Δ| of RGB in 0-255. */
async function differenceImage(srcA, srcB) {
  const [a, b] = (await Promise.all([decoded(srcA), decoded(srcB)])).map(pixels);
  if (a.width !== b.width || a.height !== b.height) throw new ApiError(0, "the images differ in size", "bad_image");
  const n = a.width * a.height;
  const diff = new Float32Array(n);
  let sum = 0, max = 0;
  for (let i = 0; i < n; i++) {
    let d = 0;
    for (let c = 0; c < 3; c++) {
      const v = Math.abs(a.data[4 * i + c] - b.data[4 * i + c]);
      sum += v;
      d = Math.max(d, v);
    }
    diff[i] = d;
    max = Math.max(max, d);
  }
  const canvas = document.createElement("canvas");
  canvas.width = a.width;
  canvas.height = a.height;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(a.width, a.height);
  for (let i = 0; i < n; i++) {
    const v = max ? Math.round((255 * diff[i]) / max) : 0;
    out.data.set([v, v, v, 255], 4 * i);
  }
  ctx.putImageData(out, 0, 0);
  return { src: canvas.toDataURL("image/png"), mean: sum / (3 * n), max };
}
