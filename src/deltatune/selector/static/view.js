// The exported page: the same tree, read-only.
"use strict";
renderTree(JSON.parse(document.getElementById("data").textContent), document.getElementById("tree"), null, null);
