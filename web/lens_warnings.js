// Shows the pack's warnings (a snapped size, an aspect outside the trained range, a cut prompt, settings that do not
// fit the model) as toasts in ComfyUI's page. The nodes send them as "lens.warning" events (nodes/comfy_bridge.py).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
  name: "lens.warnings",
  setup() {
    api.addEventListener("lens.warning", ({ detail }) => {
      const toast = app.extensionManager?.toast;
      if (toast) {
        toast.add({ severity: "warn", summary: "Lens", detail: detail.message, life: 10000 });
      } else {
        console.warn(`Lens: ${detail.message}`);
      }
    });
  },
});
