// Swagger UI's start-up script (graph/front_door.py serves the page): no inline script under
// the page's Content-Security-Policy, and no validator badge (it would call another origin).
(function () {
  "use strict";
  var host = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: host.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null,
    deepLinking: true,
  });
})();
