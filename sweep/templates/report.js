function initViewer(root) {
  var data = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
  var select = root.querySelector('select'), box = root.querySelector('.tokens');
  var readout = root.querySelector('.readout');
  var query = data.tokens.length - 1, spans = [];
  data.tokens.forEach(function (token, position) {
    var span = document.createElement('span');
    span.className = 'tok'; span.textContent = token; span.setAttribute('data-position', String(position));
    span.addEventListener('click', function () { query = position; render(); });
    span.addEventListener('mouseenter', function () { query = position; render(); });
    box.appendChild(span); spans.push(span);
  });
  select.addEventListener('change', render);
  function render() {
    var parts = select.value.split('.'), layer = +parts[0], head = +parts[1];
    var row = data.patterns[layer][head][query], best = 0;
    spans.forEach(function (span, key) {
      var weight = key <= query ? row[key] : 0;
      if (weight > row[best]) { best = key; }
      span.style.background = 'rgba(230, 110, 0, ' + weight.toFixed(3) + ')';
      span.title = 'attention ' + weight.toFixed(3);
      span.classList.toggle('query', key === query);
    });
    var predicted = data.predictions ? ' \u00b7 the model predicts next: ' + data.predictions[query].map(function (p) {
      return JSON.stringify(p[0]) + ' ' + (100 * p[1]).toFixed(0) + '%'; }).join(', ') : '';
    readout.textContent = 'head ' + select.value + ', query ' + JSON.stringify(data.tokens[query]) +
      ' (position ' + query + '): attends most to ' + JSON.stringify(data.tokens[best]) +
      ' (position ' + best + ', ' + row[best].toFixed(2) + ')' + predicted;
    root.setAttribute('data-query', String(query));
  }
  render();
}
window.addEventListener('load', function () {
  var images = Array.from(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-images-loaded', String(loaded));
  document.querySelectorAll('.viewer').forEach(initViewer);
  document.body.setAttribute('data-ready', '1');
});
