// Live updates by Server-Sent Events, and a confirmation before every action.
(function () {
  "use strict";
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
    });
  });
  var counts = document.getElementById("counts");
  if (counts && window.EventSource) {
    new EventSource(counts.dataset.events).addEventListener("counts", function (event) {
      var data = JSON.parse(event.data);
      Object.keys(data.by_status).forEach(function (status) {
        var cell = counts.querySelector('[data-count="' + status + '"]');
        if (cell) { cell.textContent = data.by_status[status]; }
      });
    });
  }
  var list = document.getElementById("tasks");
  if (list && list.dataset.live && window.EventSource) {
    var base = document.body.dataset.base;
    new EventSource(list.dataset.live).addEventListener("page", function (event) {
      var body = document.createElement("tbody");  // built from text nodes: nothing is parsed
      JSON.parse(event.data).forEach(function (task) {
        var row = body.insertRow();
        row.className = "status-" + task.status;
        var link = document.createElement("a");
        link.href = base + "/tasks/" + task.id;
        link.textContent = task.id;
        var first = row.insertCell();
        first.className = "id";
        first.appendChild(link);
        [task.name, task.status, task.progress + "%", task.attempts, task.created_at].forEach(
          function (text) { row.insertCell().textContent = text; });
      });
      if (body.rows.length) { list.replaceChild(body, list.tBodies[0]); }
    });
  }
  var live = document.getElementById("live");
  if (live && live.dataset.terminal === "no" && window.EventSource) {
    var source = new EventSource(live.dataset.events);
    source.addEventListener("task", function (event) {
      var data = JSON.parse(event.data);
      document.getElementById("status").textContent = data.status;
      document.getElementById("progress").value = data.progress;
      document.getElementById("progress-text").textContent = Math.round(data.progress) + "%";
      document.getElementById("message").textContent = data.message || "";
      if (["completed", "failed", "cancelled"].indexOf(data.status) >= 0) {
        source.close();
        window.location.reload();  // the result, the error and the actions of a finished task
      }
    });
  }
})();
