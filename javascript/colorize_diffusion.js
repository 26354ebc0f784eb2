// ColorizeDiffusion: "Use sketch size" sets the tab's width and height sliders to the sketch's aspect ratio at the
// loaded model's native size (native x native pixels: 512 for v1/v1.5, 768 for v2; the server sends it), in
// multiples of 64; for an XL checkpoint (its row of the accordion is shown) the XL app's autofit: about
// 1024 x 1024, multiples of 32, each side in 768..1536. With "Use init image as sketch" the sketch is the img2img
// init image. Called by the button's click (see cd_webui/ui.py).
(function() {
    "use strict";

    var DEFAULT_NATIVE = 512;
    var STEP = 64;
    // the img2img mode tabs' image components, in the order of the webui's #mode_img2img tabs
    var INIT_IMAGE_IDS = ["img2img_image", "img2img_sketch", "img2maskimg", "inpaint_sketch", "img_inpaint_base"];

    function snap(value) {
        return Math.max(STEP, Math.round(value / STEP) * STEP);
    }

    function setSlider(root, id, value) {
        var box = root.querySelector("#" + id);
        if (!box) return false;
        var inputs = box.querySelectorAll("input");
        for (var i = 0; i < inputs.length; i++) {
            var input = inputs[i];
            var max = parseFloat(input.max);
            input.value = isFinite(max) && max > 0 ? Math.min(value, max) : value;
            if (typeof updateInput === "function") {
                updateInput(input);
            } else {
                input.dispatchEvent(new Event("input", {bubbles: true}));
            }
        }
        return inputs.length > 0;
    }

    function imageIn(root, id) {
        var img = root.querySelector("#" + id + " img");
        return img && img.naturalWidth > 0 ? img : null;
    }

    function initImage(root) {
        var tab = -1;
        try {
            tab = typeof get_tab_index === "function" ? get_tab_index("mode_img2img") : -1;
        } catch (error) {
            tab = -1;
        }
        if (tab >= 0 && tab < INIT_IMAGE_IDS.length) return imageIn(root, INIT_IMAGE_IDS[tab]);
        for (var i = 0; i < INIT_IMAGE_IDS.length; i++) {
            var box = root.querySelector("#" + INIT_IMAGE_IDS[i]);
            var img = box && box.offsetParent !== null ? imageIn(root, INIT_IMAGE_IDS[i]) : null;
            if (img) return img;
        }
        return null;
    }

    window.colorizeDiffusionSizeFor = function(width, height, native) {
        if (!(width > 0 && height > 0)) return null;
        var side = native > 0 ? native : DEFAULT_NATIVE;
        var ratio = width / height;
        return [snap(side * Math.sqrt(ratio)), snap(side / Math.sqrt(ratio))];
    };

    // the XL app's "Autofit size" (method-xl §7.2): h' = floor(sqrt(1024² / a)), w' = floor(h' a), each rounded
    // to the nearest multiple of 32 and clamped to [768, 1536] on its own
    window.colorizeDiffusionAutofitXL = function(width, height) {
        if (!(width > 0 && height > 0)) return null;
        var ratio = width / height;
        var h = Math.floor(Math.sqrt(1024 * 1024 / ratio));
        var w = Math.floor(h * ratio);
        var fit = function(v) { return Math.max(768, Math.min(1536, Math.floor((v + 16) / 32) * 32)); };
        return [fit(w), fit(h)];
    };

    window.colorizeDiffusionUseSketchSize = function(tab, sketchId, native, useInit, xlRowId) {
        try {
            var root = typeof gradioApp === "function" ? gradioApp() : document;
            var img = useInit ? initImage(root) : imageIn(root, sketchId);
            var xlRow = xlRowId ? root.querySelector("#" + xlRowId) : null;
            var xl = xlRow !== null && xlRow.offsetParent !== null;
            var size = !img ? null : xl ? window.colorizeDiffusionAutofitXL(img.naturalWidth, img.naturalHeight)
                : window.colorizeDiffusionSizeFor(img.naturalWidth, img.naturalHeight, native);
            if (!size) {
                console.warn("ColorizeDiffusion: no " + (useInit ? "init image" : "sketch") + " to take the size from");
                return [];
            }
            setSlider(root, tab + "_width", size[0]);
            setSlider(root, tab + "_height", size[1]);
        } catch (error) {
            console.warn("ColorizeDiffusion: cannot set the size from the sketch", error);
        }
        return [];
    };
})();
