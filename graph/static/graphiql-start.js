// GraphiQL's start-up script (graph/front_door.py serves the page). No inline script: the page's
// Content-Security-Policy allows scripts from the service's own origin only.
(function () {
  "use strict";
  var host = document.getElementById("graphiql");
  var graphqlUrl = new URL(host.dataset.graphqlUrl, window.location.href).toString();
  var subscriptionUrl = graphqlUrl.replace(/^http/, "ws");
  var tokenUrl = host.dataset.devTokenUrl || null;
  var params = new URLSearchParams(window.location.search);
  var currentQuery = params.get("q") || host.dataset.example;
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
    props.query = currentQuery; // a fresh IDE (a new token) keeps the text being edited
    props.onEditQuery = function (text) {
      currentQuery = text;
    };
    if (headers) props.headers = headers;
    root.render(React.createElement(GraphiQL, props));
  }

  var latest = 0; // only the last request's token is used, whichever answers first

  function actAs(event) {
    if (event) event.preventDefault();
    var mine = ++latest;
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
        if (mine !== latest) return;
        render(JSON.stringify({ Authorization: "Bearer " + body.token }, null, 2));
        status.textContent = "acting as " + body.userId + " (token valid " + body.expiresIn / 60 + " min)";
        status.dataset.user = body.userId;
      })
      .catch(function (error) {
        if (mine !== latest) return;
        status.textContent = "no token: " + error.message;
      });
  }

  var form = document.getElementById("act-as");
  render(null);
  if (form && tokenUrl) {
    form.addEventListener("submit", actAs);
    actAs(null); // development: signed in as the default test user from the start
  }
})();
