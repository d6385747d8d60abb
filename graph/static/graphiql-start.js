// GraphiQL's start-up script (graph/front_door.py serves the page). No inline script: the page's
// Content-Security-Policy allows scripts from the service's own origin only.
(function () {
  "use strict";
  var host = document.getElementById("graphiql");
  var graphqlUrl = new URL(host.dataset.graphqlUrl, window.location.href).toString();
  var subscriptionUrl = graphqlUrl.replace(/^http/, "ws");
  var tokenUrl = host.dataset.devTokenUrl || null;
  var params = new URLSearchParams(window.location.search);
  var initialQuery = params.get("q") || host.dataset.example;
  var root = ReactDOM.createRoot(host);
  var generation = 0;

  function render(headers) {
    generation += 1;
    var props = {
      key: "graphiql-" + generation, // a new token: a fresh IDE with the new headers
      fetcher: GraphiQL.createFetcher({ url: graphqlUrl, subscriptionUrl: subscriptionUrl }),
      defaultQuery: host.dataset.example,
      defaultEditorToolsVisibility: headers ? "headers" : true,
      isHeadersEditorEnabled: true,
      shouldPersistHeaders: false,
      inputValueDeprecation: true,
    };
    if (generation === 1) props.query = initialQuery; // after that the IDE keeps the user's text
    if (headers) props.headers = headers;
    root.render(React.createElement(GraphiQL, props));
  }

  function actAs(event) {
    event.preventDefault();
    var user = document.getElementById("act-as-user").value.trim();
    var status = document.getElementById("act-as-status");
    status.textContent = "…";
    fetch(tokenUrl, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ userId: user }),
    })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body.reason || body.detail || response.statusText);
          return body;
        });
      })
      .then(function (body) {
        render(JSON.stringify({ Authorization: "Bearer " + body.token }, null, 2));
        status.textContent = "acting as " + body.userId + " (token valid " + body.expiresIn / 60 + " min)";
        status.dataset.user = body.userId;
      })
      .catch(function (error) {
        status.textContent = "no token: " + error.message;
      });
  }

  var form = document.getElementById("act-as");
  if (form && tokenUrl) form.addEventListener("submit", actAs);
  render(null);
})();
