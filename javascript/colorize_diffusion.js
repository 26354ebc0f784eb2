// ColorizeDiffusion: "Use sketch size" sets the tab's width and height sliders to the sketch's aspect ratio,
// keeping about 512 x 512 pixels and multiples of 64; for an XL checkpoint (its row of the accordion is shown) the
// XL app's autofit: about 1024 x 1024, multiples of 32, each side in 768..1536. Called by the button's click
// (see cd_webui/ui.py).
(function() {
    "use strict";

    var AREA = 512 * 512;
    var STEP = 64;

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

    window.colorizeDiffusionSizeFor = function(width, height) {
        if (!(width > 0 && height > 0)) return null;
        var ratio = width / height;
        return [snap(Math.sqrt(AREA * ratio)), snap(Math.sqrt(AREA / ratio))];
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

    window.colorizeDiffusionUseSketchSize = function(tab, sketchId, xlRowId) {
        try {
            var root = typeof gradioApp === "function" ? gradioApp() : document;
            var img = root.querySelector("#" + sketchId + " img");
            var xlRow = xlRowId ? root.querySelector("#" + xlRowId) : null;
            var xl = xlRow !== null && xlRow.offsetParent !== null;
            var rule = xl ? window.colorizeDiffusionAutofitXL : window.colorizeDiffusionSizeFor;
            var size = img ? rule(img.naturalWidth, img.naturalHeight) : null;
            if (!size) return [];
            setSlider(root, tab + "_width", size[0]);
            setSlider(root, tab + "_height", size[1]);
        } catch (error) {
            console.warn("ColorizeDiffusion: cannot set the size from the sketch", error);
        }
        return [];
    };
})();
