// The gateway serves the page with `style-src 'self'` (no 'unsafe-inline'), so browsers refuse
// <style> elements and `style` attributes. xterm.js uses both: <style> elements for its theme and
// cell dimensions, and `setAttribute('style', …)` for true-colour cells in the DOM renderer.
// CSSOM is not inline style, so this routes both through it, before xterm is loaded:
//   - createElement('style') returns an inert <template> whose textContent feeds a constructable
//     stylesheet adopted by the document (removed again with the element);
//   - setAttribute('style', v) on an HTML element sets `el.style.cssText = v`.
// Nothing else is touched.

const adopt = (doc: Document, sheet: CSSStyleSheet) => (doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet]);
const drop = (doc: Document, sheet: CSSStyleSheet) => (doc.adoptedStyleSheets = doc.adoptedStyleSheets.filter((s) => s !== sheet));

function styleStandIn(doc: Document): HTMLElement {
  const el = originalCreate.call(doc, 'template') as HTMLElement;
  el.dataset.cspStyle = '';
  const sheet = new CSSStyleSheet();
  let text = '';
  adopt(doc, sheet);
  Object.defineProperty(el, 'textContent', {
    configurable: true,
    get: () => text,
    set: (v: string | null) => {
      text = v ?? '';
      sheet.replaceSync(text);
    },
  });
  const remove = el.remove.bind(el);
  el.remove = () => {
    drop(doc, sheet);
    remove();
  };
  return el;
}

const originalCreate = Document.prototype.createElement;
Document.prototype.createElement = function (this: Document, tag: string, options?: ElementCreationOptions) {
  if (typeof tag === 'string' && tag.toLowerCase() === 'style') return styleStandIn(this);
  return originalCreate.call(this, tag, options);
} as typeof Document.prototype.createElement;

const originalSetAttribute = Element.prototype.setAttribute;
Element.prototype.setAttribute = function (this: Element, name: string, value: string) {
  if (name.toLowerCase() === 'style' && (this instanceof HTMLElement || this instanceof SVGElement)) {
    this.style.cssText = String(value);
    return;
  }
  originalSetAttribute.call(this, name, value);
};

export {};
